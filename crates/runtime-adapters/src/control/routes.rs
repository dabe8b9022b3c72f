//! The routes: one table that builds the router, decides each route's role and writes the
//! OpenAPI document, so the three cannot drift apart.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::Json;
use runtime_contracts::{DeadLetter, DeadLetterStore, HealthStatus, Probe};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Role;
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::Ctl;

/// One route of the control plane.
pub(crate) struct Route {
    pub(crate) method: &'static str,
    pub(crate) path: &'static str,
    pub(crate) role: Role,
    pub(crate) summary: &'static str,
    /// The request body the route takes, as a JSON schema, if any.
    pub(crate) body: Option<fn() -> Value>,
    pub(crate) handler: fn() -> MethodRouter<Ctl>,
}

/// Every route. Health routes are open when `open_health`.
pub(crate) fn table(open_health: bool) -> Vec<Route> {
    let health = if open_health { Role::Open } else { Role::Read };
    vec![
        Route {
            method: "get",
            path: "/health/live",
            role: health,
            summary: "The process is alive (never depends on shared dependencies)",
            body: None,
            handler: || get(live),
        },
        Route {
            method: "get",
            path: "/health/ready",
            role: health,
            summary: "Every readiness contributor, with the reason of each that is down",
            body: None,
            handler: || get(ready),
        },
        Route {
            method: "get",
            path: "/status",
            role: Role::Read,
            summary: "Runtime state, modules, sources, pools and queues",
            body: None,
            handler: || get(status),
        },
        Route {
            method: "get",
            path: "/diagnostics",
            role: Role::Read,
            summary: "Stuck leases, idle consumers, poison candidates, sources without progress and dead letters, each with what to do",
            body: None,
            handler: || get(diagnostics),
        },
        Route {
            method: "get",
            path: "/metrics",
            role: Role::Read,
            summary: "Prometheus text exposition",
            body: None,
            handler: || get(metrics),
        },
        Route {
            method: "get",
            path: "/queues/{queue}/dead-letters",
            role: Role::Read,
            summary: "Dead letters, oldest first, with cursor pagination and kind/reason filters",
            body: None,
            handler: || get(dead_letters),
        },
        Route {
            method: "get",
            path: "/queues/{queue}/dead-letters/{id}",
            role: Role::Read,
            summary: "One dead letter with its error history",
            body: None,
            handler: || get(dead_letter),
        },
        Route {
            method: "post",
            path: "/queues/{queue}/dead-letters/{id}/replay",
            role: Role::Admin,
            summary: "Put one dead letter back on its queue",
            body: None,
            handler: || post(replay_one),
        },
        Route {
            method: "post",
            path: "/queues/{queue}/dead-letters/replay",
            role: Role::Admin,
            summary: "Replay every dead letter matching the filter",
            body: Some(filter_schema),
            handler: || post(replay_matching),
        },
        Route {
            method: "delete",
            path: "/queues/{queue}/dead-letters/{id}",
            role: Role::Admin,
            summary: "Delete one dead letter for good",
            body: None,
            handler: || delete(purge_one),
        },
        Route {
            method: "get",
            path: "/actions",
            role: Role::Read,
            summary: "The actions the application offers operators, with their parameters",
            body: None,
            handler: || get(actions),
        },
        Route {
            method: "post",
            path: "/actions/{name}",
            role: Role::Admin,
            summary: "Run one of the application's actions; with dry_run, only say what it would do",
            body: Some(action_schema),
            handler: || post(run_action),
        },
        Route {
            method: "post",
            path: "/sources/{id}/pause",
            role: Role::Admin,
            summary: "Stop a source from fetching more work",
            body: None,
            handler: || post(pause),
        },
        Route {
            method: "post",
            path: "/sources/{id}/resume",
            role: Role::Admin,
            summary: "Let a paused source fetch again",
            body: None,
            handler: || post(resume),
        },
        Route {
            method: "get",
            path: "/loggers",
            role: Role::Read,
            summary: "The log filter in force",
            body: None,
            handler: || get(loggers),
        },
        Route {
            method: "post",
            path: "/loggers",
            role: Role::Admin,
            summary: "Change the log filter at run time",
            body: Some(logger_schema),
            handler: || post(set_loggers),
        },
        Route {
            method: "get",
            path: "/config",
            role: Role::Read,
            summary: "The configuration in force, secrets redacted",
            body: None,
            handler: || get(config),
        },
        Route {
            method: "post",
            path: "/config/reload",
            role: Role::Admin,
            summary: "Validate the configuration file again and apply what is safe live",
            body: None,
            handler: || post(reload),
        },
        Route {
            method: "get",
            path: "/openapi.json",
            role: Role::Read,
            summary: "This document",
            body: None,
            handler: || get(openapi),
        },
    ]
}

async fn health(ctl: &Ctl, probe: Probe, headers: &HeaderMap) -> Response {
    let mut report = ctl.runtime.health().check(probe).await;
    let status = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Open health answers anyone who reaches the port; a reason names hosts, users and
    // errors, so only a token's holder reads it (an orchestrator needs the status alone).
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if ctl.tokens.any() && ctl.tokens.authorize(authorization, Role::Read).is_err() {
        for check in &mut report.checks {
            if let HealthStatus::Down { reason } = &mut check.status {
                *reason = "down (a read token shows why)".to_owned();
            }
        }
    }
    (status, Json(report)).into_response()
}

async fn live(State(ctl): State<Ctl>, headers: HeaderMap) -> Response {
    health(&ctl, Probe::Liveness, &headers).await
}

async fn ready(State(ctl): State<Ctl>, headers: HeaderMap) -> Response {
    health(&ctl, Probe::Readiness, &headers).await
}

async fn status(State(ctl): State<Ctl>) -> Json<runtime_core::RuntimeStatus> {
    Json(ctl.runtime.status().await)
}

async fn diagnostics(State(ctl): State<Ctl>) -> Json<runtime_core::Diagnostics> {
    Json(ctl.runtime.diagnostics().await)
}

async fn metrics(State(ctl): State<Ctl>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctl.runtime.metrics_text().await,
    )
        .into_response()
}

fn store<'a>(ctl: &'a Ctl, queue: &str) -> Result<&'a dyn DeadLetterStore, ApiError> {
    let q = ctl
        .runtime
        .queue(queue)
        .ok_or_else(|| ApiError::not_found(format!("no queue {queue:?}")))?;
    q.dead_letters().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported",
            format!("queue {queue:?} keeps no dead letters"),
        )
    })
}

fn queue_error(e: runtime_contracts::QueueError) -> ApiError {
    match e {
        runtime_contracts::QueueError::DeadLetterNotFound(id) => {
            ApiError::not_found(format!("no dead letter {id:?}"))
        }
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_unavailable",
            other.to_string(),
        ),
    }
}

/// Which dead letters an operation concerns.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Filter {
    /// Only tasks of this kind.
    kind: Option<String>,
    /// Only dead letters whose reason contains this text.
    reason: Option<String>,
    /// At most this many (replay: [`REPLAY_LIMIT`] unless set, never more than [`SCAN_LIMIT`]).
    limit: Option<usize>,
}

impl Filter {
    fn keeps(&self, d: &DeadLetter) -> bool {
        self.kind.as_deref().is_none_or(|k| &*d.task.kind == k)
            && self.reason.as_deref().is_none_or(|r| d.reason.contains(r))
    }
}

fn action_schema() -> Value {
    json!({"type": "object", "description": "the action's parameters (GET /actions lists them)", "properties": {
        "dry_run": {"type": "boolean", "description": "say what would happen, change nothing"}}})
}

async fn actions(State(ctl): State<Ctl>) -> Json<Value> {
    let actions: Vec<runtime_contracts::ActionSpec> = ctl
        .runtime
        .operator_actions()
        .iter()
        .flat_map(|a| a.actions())
        .collect();
    Json(json!({ "actions": actions }))
}

async fn run_action(
    State(ctl): State<Ctl>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let Some(params) = body.as_object() else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the body must be a JSON object of the action's parameters",
        ));
    };
    let dry_run = match params.get("dry_run") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "dry_run must be true or false",
            ))
        }
    };
    let mut params = params.clone();
    params.remove("dry_run");
    match super::run_action(&ctl.runtime, &name, &Value::Object(params), dry_run).await {
        Ok(done) => Ok(Json(json!({
            "action": name,
            "dry_run": dry_run,
            "message": done.message,
            "items": done.items,
            "published": done.published,
        }))),
        Err(super::ActionFailure::NotFound) => {
            Err(ApiError::not_found(format!("no action {name:?}")))
        }
        Err(super::ActionFailure::Refused(runtime_contracts::ActionError::BadRequest(m))) => {
            Err(ApiError::bad_request("invalid_params", m))
        }
        Err(super::ActionFailure::Refused(runtime_contracts::ActionError::Unavailable(m))) => Err(
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
        ),
        Err(super::ActionFailure::Publish(m)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            m,
        )),
    }
}

fn filter_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "properties": {
        "kind": {"type": "string"}, "reason": {"type": "string", "description": "substring of the reason"},
        "limit": {"type": "integer", "minimum": 1, "maximum": SCAN_LIMIT,
            "description": "replay at most this many (default 1000); `more` in the answer says whether others match"}}})
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    cursor: Option<String>,
    limit: Option<usize>,
    kind: Option<String>,
    reason: Option<String>,
}

/// Most dead letters looked at for one listing request, and most replayed by one request.
const SCAN_LIMIT: usize = 10_000;

/// Dead letters replayed by one request that sets no `limit`.
const REPLAY_LIMIT: usize = 1_000;

async fn dead_letters(
    State(ctl): State<Ctl>,
    ApiPath(queue): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = store(&ctl, &queue)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(
            "bad_query_parameter",
            "limit must be between 1 and 500",
        ));
    }
    let filter = Filter {
        kind: q.kind,
        reason: q.reason,
        limit: None,
    };
    let mut cursor = q.cursor;
    let mut items = Vec::new();
    let mut scanned = 0;
    loop {
        // Ask for no more than still fits, so that the cursor never skips a match.
        let page = store
            .list(cursor.clone(), limit - items.len())
            .await
            .map_err(queue_error)?;
        scanned += page.items.len();
        items.extend(page.items.into_iter().filter(|d| filter.keeps(d)));
        cursor = page.next_cursor;
        if items.len() >= limit || cursor.is_none() || scanned >= SCAN_LIMIT {
            break;
        }
    }
    Ok(Json(json!({ "items": items, "next_cursor": cursor })))
}

async fn dead_letter(
    State(ctl): State<Ctl>,
    ApiPath((queue, id)): ApiPath<(String, String)>,
) -> Result<Json<DeadLetter>, ApiError> {
    let store = store(&ctl, &queue)?;
    match store.get(&id).await.map_err(queue_error)? {
        Some(d) => Ok(Json(d)),
        None => Err(ApiError::not_found(format!(
            "no dead letter {id:?} in queue {queue:?}"
        ))),
    }
}

async fn replay_one(
    State(ctl): State<Ctl>,
    ApiPath((queue, id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    store(&ctl, &queue)?
        .replay(&id)
        .await
        .map_err(queue_error)?;
    tracing::info!(queue, id, "dead letter replayed by an operator");
    Ok(Json(json!({ "replayed": [id] })))
}

async fn replay_matching(
    State(ctl): State<Ctl>,
    ApiPath(queue): ApiPath<String>,
    ApiJson(filter): ApiJson<Filter>,
) -> Result<Json<Value>, ApiError> {
    let store = store(&ctl, &queue)?;
    let limit = filter.limit.unwrap_or(REPLAY_LIMIT);
    if !(1..=SCAN_LIMIT).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("limit must be between 1 and {SCAN_LIMIT}"),
        ));
    }
    // The ids are collected first (a replay changes the list under a cursor), a bounded
    // number of them: the rest are left for the next request, which `more` asks for.
    let mut ids = Vec::new();
    let mut cursor = None;
    let mut more = false;
    loop {
        let page = store.list(cursor, 500).await.map_err(queue_error)?;
        for d in page.items.iter().filter(|d| filter.keeps(d)) {
            if ids.len() == limit {
                more = true;
                break;
            }
            ids.push(d.id.clone());
        }
        match page.next_cursor {
            Some(next) if !more => cursor = Some(next),
            _ => break,
        }
    }
    let mut replayed = Vec::new();
    for id in ids {
        match store.replay(&id).await {
            Ok(()) => replayed.push(id),
            // Replayed or purged by someone else meanwhile: not ours to report.
            Err(runtime_contracts::QueueError::DeadLetterNotFound(_)) => {}
            Err(e) => return Err(queue_error(e)),
        }
    }
    tracing::info!(
        queue,
        count = replayed.len(),
        more,
        "dead letters replayed by an operator"
    );
    Ok(Json(json!({ "replayed": replayed, "more": more })))
}

async fn purge_one(
    State(ctl): State<Ctl>,
    ApiPath((queue, id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    store(&ctl, &queue)?.purge(&id).await.map_err(queue_error)?;
    tracing::info!(queue, id, "dead letter deleted by an operator");
    Ok(Json(json!({ "deleted": id })))
}

async fn pause(
    State(ctl): State<Ctl>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    if !ctl.runtime.pause_source(&id) {
        return Err(ApiError::not_found(format!("no source {id:?}")));
    }
    Ok(Json(json!({ "source": id, "paused": true })))
}

async fn resume(
    State(ctl): State<Ctl>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    if !ctl.runtime.resume_source(&id) {
        return Err(ApiError::not_found(format!("no source {id:?}")));
    }
    Ok(Json(json!({ "source": id, "paused": false })))
}

fn log_control(ctl: &Ctl) -> Result<&std::sync::Arc<runtime_core::LogControl>, ApiError> {
    ctl.runtime.logs().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported",
            "this process does not own its log subscriber",
        )
    })
}

async fn loggers(State(ctl): State<Ctl>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "filter": log_control(&ctl)?.current() })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoggerUpdate {
    filter: String,
}

fn logger_schema() -> Value {
    json!({"type": "object", "required": ["filter"], "additionalProperties": false,
        "properties": {"filter": {"type": "string", "example": "info,mail_order_bot=debug"}}})
}

async fn set_loggers(
    State(ctl): State<Ctl>,
    ApiJson(update): ApiJson<LoggerUpdate>,
) -> Result<Json<Value>, ApiError> {
    let logs = log_control(&ctl)?;
    logs.set(&update.filter)
        .map_err(|e| ApiError::bad_request("invalid_log_filter", e))?;
    tracing::info!(filter = update.filter, "log filter changed by an operator");
    Ok(Json(json!({ "filter": logs.current() })))
}

/// Keys whose values are never shown.
const SECRET_KEYS: &[&str] = &["password", "secret", "token", "credential", "api_key"];

/// The configuration with every secret replaced, including passwords inside URLs.
pub(crate) fn redact(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let lower = k.to_lowercase();
                    let secret = SECRET_KEYS.iter().any(|s| lower.contains(s));
                    (
                        k.clone(),
                        if secret {
                            json!("[redacted]")
                        } else {
                            redact(v)
                        },
                    )
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        Value::String(s) => Value::String(crate::secret::redact_url(s)),
        other => other.clone(),
    }
}

async fn config(State(ctl): State<Ctl>) -> Json<Value> {
    Json(redact(&ctl.runtime.config().root()))
}

async fn reload(State(ctl): State<Ctl>) -> Result<Json<runtime_core::ReloadReport>, ApiError> {
    let runtime = ctl.runtime.clone();
    // Reading and validating a file is blocking work.
    let result = tokio::task::spawn_blocking(move || runtime.reload())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "reload failed",
            )
        })?;
    match result {
        Ok(report) => Ok(Json(report)),
        Err(report) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            format!(
                "the configuration has {} problem(s); nothing changed",
                report.problems.len()
            ),
        )
        .with_details(json!({ "problems": report.problems }))),
    }
}

async fn openapi(State(_): State<Ctl>) -> Json<Value> {
    Json(super::openapi::openapi_document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let v = json!({"control": {"admin_tokens": ["t"], "bind": "127.0.0.1:8080"},
            "store": {"url": "postgres://bot:hunter2@db/orders"}, "imap": {"password_file": "/x"}});
        let r = redact(&v);
        assert_eq!(r["control"]["admin_tokens"], "[redacted]");
        assert_eq!(r["control"]["bind"], "127.0.0.1:8080");
        assert_eq!(r["store"]["url"], "postgres://bot:[redacted]@db/orders");
        assert_eq!(r["imap"]["password_file"], "[redacted]");
        assert!(!r.to_string().contains("hunter2"));
    }
}
