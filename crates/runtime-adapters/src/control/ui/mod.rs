//! The operator web console under `/ui`, served by the control plane.
//!
//! Security, the same as the API's and then some:
//! - A token logs in once, through a form; the page then works with a random session id in
//!   an `HttpOnly`, `SameSite=Strict` cookie (`Secure` when `ui_secure_cookie`). The token is
//!   never written in a page, a cookie or a log.
//! - A read token may look; only an admin token acts. A read session gets no action buttons,
//!   and its POSTs are refused (403).
//! - Every POST carries the session's CSRF token; the login form has its own (double
//!   submit), so a foreign site cannot log a browser in either.
//! - Every action asks for a confirmation first.
//! - Closed by default: without a configured token there is nothing to log in with.
//! - Strict headers: a Content-Security-Policy without inline scripts or styles, no
//!   framing, no caching, no referrer.

mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::Markup;
use runtime_contracts::console::{ConsoleError, ConsoleRequest};
use runtime_contracts::{DeadLetter, DeadLetterStore, QueueError};
use runtime_core::RuntimeManager;
use subtle::ConstantTimeEq;

use super::auth::{Role, Tokens};

/// The session cookie.
const SESSION_COOKIE: &str = "plba_session";
/// The login form's own CSRF cookie (double submit).
const LOGIN_COOKIE: &str = "plba_login";
/// Sessions kept at once; the oldest goes first beyond.
const MAX_SESSIONS: usize = 1024;
/// A session ends this long after login, however busy.
const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// How long a wrong token waits for its answer.
/// Dead letters looked at per queue for one page.
const DEAD_LETTER_SCAN: usize = 5_000;
/// Dead letters shown on one page.
const DEAD_LETTER_ROWS: usize = 200;

struct Session {
    role: Role,
    /// Who logged in, for the logs (the token's label).
    actor: String,
    csrf: String,
    created: Instant,
    last_seen: Instant,
    flash: Option<String>,
}

/// Logged-in sessions, in memory: a restart logs everyone out.
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    idle: Duration,
}

/// Who is asking, from a valid session.
#[derive(Clone, Debug)]
pub(crate) struct Who {
    id: String,
    pub(crate) role: Role,
    pub(crate) csrf: String,
    pub(crate) flash: Option<String>,
}

impl Who {
    pub(crate) fn admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// 32 random bytes in hex.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness from the OS: refuse every session rather than make guessable ones.
        return String::new();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn same(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Sessions {
    fn new(idle: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            idle,
        }
    }

    fn create(&self, role: Role, actor: String) -> Option<String> {
        let id = random_token();
        let csrf = random_token();
        if id.is_empty() || csrf.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| !self.expired(s, now));
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                role,
                actor,
                csrf,
                created: now,
                last_seen: now,
                flash: None,
            },
        );
        Some(id)
    }

    fn expired(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_seen) >= self.idle
            || now.duration_since(s.created) >= SESSION_MAX_AGE
    }

    /// The session `id` with its flash message taken; `touch`: an operator's request
    /// (a page, a form), which keeps the session alive; the live panel's polling does not.
    fn get(&self, id: &str, touch: bool) -> Option<Who> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let session = map.get_mut(id)?;
        if self.expired(session, now) {
            map.remove(id);
            return None;
        }
        if touch {
            session.last_seen = now;
        }
        Some(Who {
            id: id.to_owned(),
            role: session.role,
            csrf: session.csrf.clone(),
            flash: session.flash.take(),
        })
    }

    /// The actor of session `id`, without touching it.
    fn actor_of(&self, id: &str) -> Option<String> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).map(|s| s.actor.clone())
    }

    fn flash(&self, id: &str, message: String) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get_mut(id) {
            s.flash = Some(message);
        }
    }

    fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// What the console's handlers share.
#[derive(Clone)]
pub(crate) struct Ui {
    pub(crate) runtime: Arc<RuntimeManager>,
    tokens: Arc<Tokens>,
    sessions: Arc<Sessions>,
    secure_cookie: bool,
    throttle: Arc<super::auth::Throttle>,
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Ui {
    fn set_cookie(&self, name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
        let mut c = format!("{name}={value}; Path=/ui; HttpOnly; SameSite=Strict");
        if let Some(age) = max_age {
            c.push_str(&format!("; Max-Age={age}"));
        }
        if self.secure_cookie {
            c.push_str("; Secure");
        }
        HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    // The error is the answer itself (a redirect or a refusal), returned at once.
    #[allow(clippy::result_large_err)]
    fn who(&self, headers: &HeaderMap) -> Result<Who, Response> {
        self.session(headers, true)
    }

    /// [`Ui::who`]; `touch`: whether the request keeps the session alive.
    #[allow(clippy::result_large_err)]
    fn session(&self, headers: &HeaderMap, touch: bool) -> Result<Who, Response> {
        let presented = cookie(headers, SESSION_COOKIE);
        match presented.and_then(|id| self.sessions.get(id, touch)) {
            Some(who) => Ok(who),
            None => {
                let to = if presented.is_some() {
                    "/ui/login?expired=1"
                } else {
                    "/ui/login"
                };
                Err(Redirect::to(to).into_response())
            }
        }
    }

    /// The session of a POST that may act: admin, with the right CSRF token.
    #[allow(clippy::result_large_err)]
    fn actor(&self, headers: &HeaderMap, form: &HashMap<String, String>) -> Result<Who, Response> {
        let who = self.who(headers)?;
        let csrf = form.get("csrf").map(String::as_str).unwrap_or_default();
        if !same(csrf, &who.csrf) {
            return Err(self.problem(
                Some(&who),
                StatusCode::FORBIDDEN,
                "Refused",
                "The form's security token is missing or wrong (CSRF). Reload the page and try again.",
            ));
        }
        if !who.admin() {
            return Err(self.problem(
                Some(&who),
                StatusCode::FORBIDDEN,
                "Not allowed",
                "This needs an admin token; this session was opened with a read token.",
            ));
        }
        Ok(who)
    }

    fn problem(
        &self,
        who: Option<&Who>,
        status: StatusCode,
        title: &str,
        message: &str,
    ) -> Response {
        let body = view::problem(message);
        let page = match who {
            Some(who) => view::page(title, "", who, &self.runtime, body),
            None => view::bare(title, body),
        };
        (status, page).into_response()
    }

    fn done(&self, who: &Who, message: String, to: &str) -> Response {
        self.sessions.flash(&who.id, message);
        Redirect::to(to).into_response()
    }

    fn dead_letter_store(&self, queue: &str) -> Option<&dyn DeadLetterStore> {
        self.runtime.queue(queue).and_then(|q| q.dead_letters())
    }
}

/// The console's routes, with their own state; `None` when `[control] ui = false`.
pub(crate) fn router(
    runtime: Arc<RuntimeManager>,
    tokens: Arc<Tokens>,
    throttle: Arc<super::auth::Throttle>,
    idle: Duration,
    secure_cookie: bool,
) -> Router {
    let ui = Ui {
        runtime,
        tokens,
        sessions: Arc::new(Sessions::new(idle)),
        secure_cookie,
        throttle,
    };
    Router::new()
        .route("/ui", get(overview))
        .route("/ui/", get(|| async { Redirect::permanent("/ui") }))
        .route("/ui/live", get(live))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/dead-letters", get(dead_letters))
        .route("/ui/retries", get(retries))
        .route("/ui/dead-letters/replay", post(replay_matching))
        .route("/ui/dead-letters/{queue}/{id}", get(dead_letter))
        .route("/ui/dead-letters/{queue}/{id}/replay", post(replay_one))
        .route("/ui/dead-letters/{queue}/{id}/delete", post(delete_one))
        .route("/ui/sources/{id}/pause", post(pause))
        .route("/ui/sources/{id}/resume", post(resume))
        .route("/ui/actions", get(actions))
        .route("/ui/actions/{name}", post(run_action))
        .route("/ui/loggers", get(loggers).post(set_loggers))
        .route("/ui/config", get(config))
        .route("/ui/config/reload", post(reload))
        .route("/ui/app/{page}", get(app_page))
        .route("/ui/static/app.css", get(css))
        .route("/ui/static/app.js", get(js))
        .layer(axum::middleware::from_fn(security_headers))
        .layer(axum::middleware::from_fn_with_state(
            ui.clone(),
            log_actions,
        ))
        .with_state(ui)
}

/// Headers on every console answer.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The HTML page of an unknown `/ui/...` address.
pub(crate) fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        view::bare(
            "Not found",
            view::problem("There is no such page in the console."),
        ),
    )
        .into_response()
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("app.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("app.js"),
    )
        .into_response()
}

type FormMap = Result<Form<HashMap<String, String>>, axum::extract::rejection::FormRejection>;

fn form_of(form: FormMap) -> HashMap<String, String> {
    form.map(|Form(f)| f).unwrap_or_default()
}

fn confirmed(form: &HashMap<String, String>) -> bool {
    form.get("confirm").is_some_and(|v| v == "yes")
}

// ---- login ----

async fn login_form(State(ui): State<Ui>, Query(q): Query<HashMap<String, String>>) -> Response {
    let nonce = random_token();
    let notice = q
        .contains_key("expired")
        .then_some("Your session has ended; log in again.");
    let mut response = view::login(ui.tokens.any(), &nonce, notice, None).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        ui.set_cookie(LOGIN_COOKIE, &nonce, Some(600)),
    );
    response
}

async fn login(
    State(ui): State<Ui>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    form: FormMap,
) -> Response {
    let form = form_of(form);
    let ip = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|p| p.0.ip());
    let refuse = |status: StatusCode, message: &str| {
        let nonce = random_token();
        let mut response = (
            status,
            view::login(ui.tokens.any(), &nonce, None, Some(message)),
        )
            .into_response();
        response.headers_mut().insert(
            header::SET_COOKIE,
            ui.set_cookie(LOGIN_COOKIE, &nonce, Some(600)),
        );
        response
    };
    let posted = form.get("csrf").map(String::as_str).unwrap_or_default();
    if !cookie(&headers, LOGIN_COOKIE).is_some_and(|c| same(posted, c)) {
        return refuse(
            StatusCode::FORBIDDEN,
            "The login form expired or did not come from this console (CSRF). Try again.",
        );
    }
    if !ui.tokens.any() {
        return refuse(
            StatusCode::FORBIDDEN,
            "The console is closed: no token is configured.",
        );
    }
    let token = form.get("token").map(String::as_str).unwrap_or_default();
    // Wrong guesses are counted per address, as for bearer tokens: beyond a few a minute,
    // no token is checked from there until the minute is over (no request waits holding a
    // slot of the plane's limit).
    if ui.throttle.blocked(ip).is_some() {
        tracing::warn!("console login refused: too many wrong tokens from this address");
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many wrong tokens from this address; wait a minute.",
        );
    }
    let Some(role) = ui.tokens.role_of(token) else {
        ui.throttle.failed(ip);
        tracing::warn!("console login refused: the token is not valid");
        return refuse(StatusCode::UNAUTHORIZED, "That token is not valid.");
    };
    let actor = ui
        .tokens
        .label_of(token)
        .unwrap_or_else(|| format!("{role:?} token"));
    let Some(id) = ui.sessions.create(role, actor.clone()) else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "No session could be made (no randomness from the system).",
        );
    };
    tracing::info!(role = ?role, %actor, "console login");
    let mut response = Redirect::to("/ui").into_response();
    let h = response.headers_mut();
    h.append(
        header::SET_COOKIE,
        ui.set_cookie(SESSION_COOKIE, &id, Some(SESSION_MAX_AGE.as_secs())),
    );
    h.append(header::SET_COOKIE, ui.set_cookie(LOGIN_COOKIE, "", Some(0)));
    response
}

async fn logout(State(ui): State<Ui>, headers: HeaderMap, form: FormMap) -> Response {
    let form = form_of(form);
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    if !same(
        form.get("csrf").map(String::as_str).unwrap_or_default(),
        &who.csrf,
    ) {
        return ui.problem(
            Some(&who),
            StatusCode::FORBIDDEN,
            "Refused",
            "The form's security token is missing or wrong (CSRF).",
        );
    }
    ui.sessions.remove(&who.id);
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        ui.set_cookie(SESSION_COOKIE, "", Some(0)),
    );
    response
}

// ---- overview ----

async fn overview(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let live = live_part(&ui, &who).await;
    view::page("Overview", "/ui", &who, &ui.runtime, view::overview(live)).into_response()
}

async fn live_part(ui: &Ui, who: &Who) -> Markup {
    let status = ui.runtime.status().await;
    let ready = ui
        .runtime
        .health()
        .check(runtime_contracts::Probe::Readiness)
        .await;
    let activity = ui.runtime.activity();
    view::live(who, &status, &ready, &activity)
}

/// Every console form that acts is logged with the session's actor (the label of the
/// token it logged in with), its path and the answer.
async fn log_actions(
    State(ui): State<Ui>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() != axum::http::Method::POST || request.uri().path() == "/ui/login" {
        return next.run(request).await;
    }
    let actor = cookie(request.headers(), SESSION_COOKIE)
        .and_then(|id| ui.sessions.actor_of(id))
        .unwrap_or_else(|| "no session".to_owned());
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    tracing::info!(%actor, %path, status = response.status().as_u16(), "console action");
    response
}

async fn live(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    // The page's script polls this every 2 s: an open, unattended tab must not keep its
    // session alive for ever.
    let who = match ui.session(&headers, false) {
        Ok(who) => who,
        // The script reloads the page, which leads to the login form.
        Err(_) => return StatusCode::UNAUTHORIZED.into_response(),
    };
    live_part(&ui, &who).await.into_response()
}

// ---- dead letters ----

/// Which dead letters a page or an action concerns.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeadFilter {
    pub(crate) queue: String,
    pub(crate) kind: String,
    pub(crate) reason: String,
    pub(crate) search: String,
}

impl DeadFilter {
    fn of(map: &HashMap<String, String>) -> Self {
        let get = |k: &str| map.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
        Self {
            queue: get("queue"),
            kind: get("kind"),
            reason: get("reason"),
            search: get("q"),
        }
    }

    fn keeps(&self, d: &DeadLetter) -> bool {
        (self.kind.is_empty() || *d.task.kind == *self.kind)
            && (self.reason.is_empty() || d.reason.contains(&self.reason))
            && (self.search.is_empty() || {
                let s = self.search.to_lowercase();
                d.id.to_lowercase().contains(&s)
                    || d.reason.to_lowercase().contains(&s)
                    || d.task.payload.to_string().to_lowercase().contains(&s)
                    || d.task
                        .history
                        .iter()
                        .any(|h| h.reason.to_lowercase().contains(&s))
            })
    }

    pub(crate) fn query(&self) -> String {
        let mut q = Vec::new();
        for (k, v) in [
            ("queue", &self.queue),
            ("kind", &self.kind),
            ("reason", &self.reason),
            ("q", &self.search),
        ] {
            if !v.is_empty() {
                q.push(format!("{k}={}", view::url_encode(v)));
            }
        }
        if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        }
    }
}

/// The queues that keep dead letters, by name.
fn dead_letter_queues(ui: &Ui) -> Vec<String> {
    ui.runtime
        .pool_names()
        .into_iter()
        .filter(|p| ui.dead_letter_store(p).is_some())
        .collect()
}

/// Matching dead letters of every queue the filter names, and whether the scan stopped
/// before the end.
async fn matching(
    ui: &Ui,
    filter: &DeadFilter,
) -> Result<(Vec<(String, DeadLetter)>, bool), QueueError> {
    let mut found = Vec::new();
    let mut truncated = false;
    for queue in dead_letter_queues(ui) {
        if !filter.queue.is_empty() && filter.queue != queue {
            continue;
        }
        let Some(store) = ui.dead_letter_store(&queue) else {
            continue;
        };
        let mut cursor = None;
        let mut scanned = 0;
        loop {
            let page = store.list(cursor, 500).await?;
            scanned += page.items.len();
            found.extend(
                page.items
                    .into_iter()
                    .filter(|d| filter.keeps(d))
                    .map(|d| (queue.clone(), d)),
            );
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
            if scanned >= DEAD_LETTER_SCAN {
                truncated = true;
                break;
            }
        }
    }
    Ok((found, truncated))
}

async fn dead_letters(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let filter = DeadFilter::of(&q);
    let queues = dead_letter_queues(&ui);
    let body = match matching(&ui, &filter).await {
        Ok((found, truncated)) => {
            view::dead_letters(&who, &queues, &filter, &found, DEAD_LETTER_ROWS, truncated)
        }
        Err(e) => view::problem(&format!("The dead letters could not be read: {e}")),
    };
    view::page("Dead letters", "/ui/dead-letters", &who, &ui.runtime, body).into_response()
}

/// The tasks waiting for their next attempt, soonest first, with when it is due.
async fn retries(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let diagnostics = ui.runtime.diagnostics().await;
    view::page(
        "Retries",
        "/ui/retries",
        &who,
        &ui.runtime,
        view::retries(&diagnostics.retries, &diagnostics.not_inspected),
    )
    .into_response()
}

async fn dead_letter(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path((queue, id)): Path<(String, String)>,
) -> Response {
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let missing = |ui: &Ui| {
        ui.problem(
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no dead letter {id:?} in queue {queue:?}."),
        )
    };
    let Some(store) = ui.dead_letter_store(&queue) else {
        return missing(&ui);
    };
    match store.get(&id).await {
        Ok(Some(d)) => view::page(
            "Dead letter",
            "/ui/dead-letters",
            &who,
            &ui.runtime,
            view::dead_letter(&who, &queue, &d),
        )
        .into_response(),
        Ok(None) => missing(&ui),
        Err(e) => ui.problem(
            Some(&who),
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            &format!("The dead letter could not be read: {e}"),
        ),
    }
}

async fn replay_one(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path((queue, id)): Path<(String, String)>,
    form: FormMap,
) -> Response {
    one_action(ui, headers, queue, id, form_of(form), OneAction::Replay).await
}

async fn delete_one(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path((queue, id)): Path<(String, String)>,
    form: FormMap,
) -> Response {
    one_action(ui, headers, queue, id, form_of(form), OneAction::Delete).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OneAction {
    Replay,
    Delete,
}

async fn one_action(
    ui: Ui,
    headers: HeaderMap,
    queue: String,
    id: String,
    form: HashMap<String, String>,
    action: OneAction,
) -> Response {
    let who = match ui.actor(&headers, &form) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let Some(store) = ui.dead_letter_store(&queue) else {
        return ui.problem(
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no queue {queue:?} with dead letters."),
        );
    };
    let (verb, path) = match action {
        OneAction::Replay => ("Replay", "replay"),
        OneAction::Delete => ("Delete", "delete"),
    };
    if !confirmed(&form) {
        let what = match action {
            OneAction::Replay => format!(
                "Put dead letter {id} back on queue {queue}? It gets a full set of attempts again."
            ),
            OneAction::Delete => format!(
                "Delete dead letter {id} of queue {queue} for good? Its work will not be done."
            ),
        };
        return view::page(
            &format!("{verb} dead letter?"),
            "/ui/dead-letters",
            &who,
            &ui.runtime,
            view::confirm(
                &who,
                &what,
                &format!(
                    "/ui/dead-letters/{}/{}/{path}",
                    view::url_encode(&queue),
                    view::url_encode(&id)
                ),
                &[],
                verb,
                &format!(
                    "/ui/dead-letters/{}/{}",
                    view::url_encode(&queue),
                    view::url_encode(&id)
                ),
                action == OneAction::Delete,
            ),
        )
        .into_response();
    }
    let result = match action {
        OneAction::Replay => store.replay(&id).await,
        OneAction::Delete => store.purge(&id).await,
    };
    match result {
        Ok(()) => {
            tracing::info!(
                queue,
                id,
                action = path,
                "dead letter handled from the console"
            );
            let message = match action {
                OneAction::Replay => format!("Dead letter {id} was put back on queue {queue}."),
                OneAction::Delete => format!("Dead letter {id} was deleted."),
            };
            ui.done(&who, message, "/ui/dead-letters")
        }
        Err(QueueError::DeadLetterNotFound(_)) => ui.problem(
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!(
                "There is no dead letter {id:?} in queue {queue:?} (replayed or deleted already?)."
            ),
        ),
        Err(e) => ui.problem(
            Some(&who),
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            &format!("The queue refused: {e}"),
        ),
    }
}

async fn replay_matching(State(ui): State<Ui>, headers: HeaderMap, form: FormMap) -> Response {
    let form = form_of(form);
    let who = match ui.actor(&headers, &form) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let filter = DeadFilter::of(&form);
    let found = match matching(&ui, &filter).await {
        Ok((found, _)) => found,
        Err(e) => {
            return ui.problem(
                Some(&who),
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                &format!("The dead letters could not be read: {e}"),
            )
        }
    };
    if !confirmed(&form) {
        let keep: Vec<(&str, &str)> = [
            ("queue", filter.queue.as_str()),
            ("kind", filter.kind.as_str()),
            ("reason", filter.reason.as_str()),
            ("q", filter.search.as_str()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
        return view::page(
            "Replay dead letters?",
            "/ui/dead-letters",
            &who,
            &ui.runtime,
            view::confirm(
                &who,
                &format!(
                    "Put the {} matching dead letter(s) back on their queues?",
                    found.len()
                ),
                "/ui/dead-letters/replay",
                &keep,
                "Replay all matching",
                &format!("/ui/dead-letters{}", filter.query()),
                false,
            ),
        )
        .into_response();
    }
    let mut replayed = 0usize;
    for (queue, d) in &found {
        let Some(store) = ui.dead_letter_store(queue) else {
            continue;
        };
        match store.replay(&d.id).await {
            Ok(()) => replayed += 1,
            Err(QueueError::DeadLetterNotFound(_)) => {}
            Err(e) => {
                return ui.problem(
                    Some(&who),
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Unavailable",
                    &format!("Replayed {replayed}, then the queue refused: {e}"),
                )
            }
        }
    }
    tracing::info!(count = replayed, "dead letters replayed from the console");
    ui.done(
        &who,
        format!("{replayed} dead letter(s) were put back on their queues."),
        "/ui/dead-letters",
    )
}

// ---- sources ----

async fn pause(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: FormMap,
) -> Response {
    source_action(ui, headers, id, form_of(form), true).await
}

async fn resume(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: FormMap,
) -> Response {
    source_action(ui, headers, id, form_of(form), false).await
}

async fn source_action(
    ui: Ui,
    headers: HeaderMap,
    id: String,
    form: HashMap<String, String>,
    paused: bool,
) -> Response {
    let who = match ui.actor(&headers, &form) {
        Ok(who) => who,
        Err(r) => return r,
    };
    if !ui.runtime.source_ids().contains(&id) {
        return ui.problem(
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no source {id:?}."),
        );
    }
    let (verb, path) = if paused {
        ("Pause", "pause")
    } else {
        ("Resume", "resume")
    };
    if !confirmed(&form) {
        let what = if paused {
            format!("Pause source {id}? It stops fetching new work; work already queued goes on.")
        } else {
            format!("Resume source {id}? It starts fetching again.")
        };
        return view::page(
            &format!("{verb} source?"),
            "/ui",
            &who,
            &ui.runtime,
            view::confirm(
                &who,
                &what,
                &format!("/ui/sources/{}/{path}", view::url_encode(&id)),
                &[],
                verb,
                "/ui",
                false,
            ),
        )
        .into_response();
    }
    let changed = if paused {
        ui.runtime.pause_source(&id)
    } else {
        ui.runtime.resume_source(&id)
    };
    if !changed {
        return ui.problem(
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no source {id:?}."),
        );
    }
    tracing::info!(source = id, paused, "source changed from the console");
    let state = if paused { "paused" } else { "resumed" };
    ui.done(&who, format!("Source {id} is {state}."), "/ui")
}

// ---- loggers ----

// ---- the application's actions ----

async fn actions(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let specs: Vec<runtime_contracts::ActionSpec> = ui
        .runtime
        .operator_actions()
        .iter()
        .flat_map(|a| a.actions())
        .collect();
    view::page(
        "Actions",
        "/ui/actions",
        &who,
        &ui.runtime,
        view::actions(&who, &specs),
    )
    .into_response()
}

/// An action's form: without `confirm`, a dry run and a page that asks; with it, the run.
async fn run_action(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(name): Path<String>,
    form: FormMap,
) -> Response {
    let form = form_of(form);
    let who = match ui.actor(&headers, &form) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let run = confirmed(&form);
    let mut kept: Vec<(&str, &str)> = form
        .iter()
        .filter(|(k, v)| !matches!(k.as_str(), "csrf" | "confirm") && !v.trim().is_empty())
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    kept.sort_unstable();
    // Form fields are text: each parameter is the string it says.
    let params: serde_json::Map<String, serde_json::Value> = kept
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.trim())))
        .collect();
    match super::run_action(&ui.runtime, &name, &serde_json::Value::Object(params), !run).await {
        Ok(done) if run => ui.done(
            &who,
            format!("{} ({} task(s) published).", done.message, done.published),
            "/ui/actions",
        ),
        Ok(done) => view::page(
            &format!("Run {name}?"),
            "/ui/actions",
            &who,
            &ui.runtime,
            view::action_preview(&who, &name, &done.message, &done.items, &kept),
        )
        .into_response(),
        Err(super::ActionFailure::NotFound) => ui.problem(
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no action {name:?}."),
        ),
        Err(super::ActionFailure::Refused(runtime_contracts::ActionError::BadRequest(m))) => {
            ui.problem(Some(&who), StatusCode::BAD_REQUEST, "Refused", &m)
        }
        Err(super::ActionFailure::Refused(runtime_contracts::ActionError::Unavailable(m)))
        | Err(super::ActionFailure::Publish(m)) => ui.problem(
            Some(&who),
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            &m,
        ),
    }
}

async fn loggers(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let current = ui.runtime.logs().map(|l| l.current());
    view::page(
        "Loggers",
        "/ui/loggers",
        &who,
        &ui.runtime,
        view::loggers(&who, current.as_deref(), None),
    )
    .into_response()
}

async fn set_loggers(State(ui): State<Ui>, headers: HeaderMap, form: FormMap) -> Response {
    let form = form_of(form);
    let who = match ui.actor(&headers, &form) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let Some(logs) = ui.runtime.logs() else {
        return ui.problem(
            Some(&who),
            StatusCode::NOT_IMPLEMENTED,
            "Not supported",
            "This process does not own its log subscriber.",
        );
    };
    let filter = form
        .get("filter")
        .map(|f| f.trim().to_owned())
        .unwrap_or_default();
    if !confirmed(&form) {
        return view::page(
            "Change the log filter?",
            "/ui/loggers",
            &who,
            &ui.runtime,
            view::confirm(
                &who,
                &format!(
                    "Change the log filter from {:?} to {filter:?}?",
                    logs.current()
                ),
                "/ui/loggers",
                &[("filter", filter.as_str())],
                "Change",
                "/ui/loggers",
                false,
            ),
        )
        .into_response();
    }
    match logs.set(&filter) {
        Ok(()) => {
            tracing::info!(filter, "log filter changed from the console");
            ui.done(
                &who,
                format!("The log filter is now {:?}.", logs.current()),
                "/ui/loggers",
            )
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            view::page(
                "Loggers",
                "/ui/loggers",
                &who,
                &ui.runtime,
                view::loggers(
                    &who,
                    Some(&logs.current()),
                    Some(&format!("{filter:?} is not a valid filter: {e}")),
                ),
            ),
        )
            .into_response(),
    }
}

// ---- configuration ----

async fn config(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let redacted = super::routes::redact(&ui.runtime.config().root());
    let status = ui.runtime.status().await;
    view::page(
        "Configuration",
        "/ui/config",
        &who,
        &ui.runtime,
        view::config(&who, &redacted, &status.config),
    )
    .into_response()
}

async fn reload(State(ui): State<Ui>, headers: HeaderMap, form: FormMap) -> Response {
    let form = form_of(form);
    let who = match ui.actor(&headers, &form) {
        Ok(who) => who,
        Err(r) => return r,
    };
    if !confirmed(&form) {
        return view::page(
            "Reload the configuration?",
            "/ui/config",
            &who,
            &ui.runtime,
            view::confirm(
                &who,
                "Read the configuration again and apply what can change live? An invalid file changes nothing.",
                "/ui/config/reload",
                &[],
                "Reload",
                "/ui/config",
                false,
            ),
        )
        .into_response();
    }
    let before = super::routes::redact(&ui.runtime.config().root());
    let runtime = Arc::clone(&ui.runtime);
    let result = match tokio::task::spawn_blocking(move || runtime.reload()).await {
        Ok(result) => result,
        Err(_) => {
            return ui.problem(
                Some(&who),
                StatusCode::INTERNAL_SERVER_ERROR,
                "Failed",
                "The reload failed.",
            )
        }
    };
    let after = super::routes::redact(&ui.runtime.config().root());
    tracing::info!(
        applied = result.is_ok(),
        "configuration reload from the console"
    );
    let status = if result.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (
        status,
        view::page(
            "Configuration reload",
            "/ui/config",
            &who,
            &ui.runtime,
            view::reload_result(&result, &before, &after),
        ),
    )
        .into_response()
}

// ---- the application's pages ----

async fn app_page(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(page): Path<String>,
    Query(mut params): Query<HashMap<String, String>>,
) -> Response {
    let who = match ui.who(&headers) {
        Ok(who) => who,
        Err(r) => return r,
    };
    let owner = ui
        .runtime
        .console_pages()
        .iter()
        .find(|m| m.pages().iter().any(|p| p.id == page));
    let Some(owner) = owner else {
        return ui.problem(
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no page {page:?}."),
        );
    };
    let item = params.remove("item").filter(|i| !i.is_empty());
    let request = ConsoleRequest {
        page: page.clone(),
        item,
        params: params
            .into_iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .collect(),
    };
    let nav = format!("/ui/app/{page}");
    match owner.render(&request).await {
        Ok(v) => view::page(
            &v.title.clone(),
            &nav,
            &who,
            &ui.runtime,
            view::app_view(&page, &v),
        )
        .into_response(),
        Err(e) => {
            let status = match e {
                ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
                ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            ui.problem(Some(&who), status, "Cannot show this page", &e.to_string())
        }
    }
}
