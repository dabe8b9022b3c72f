//! The HTTP control plane: every route and every bad request in process
//! (`tower::ServiceExt::oneshot`), readiness, reload, and one run of the real bot over a
//! real port where a dead letter is replayed after its fault is fixed; the alert rules and
//! the dashboard in `deploy/` against promtool and the metrics the bot exposes.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::plane::{call, plane, refuse_sku_666, three_fixed_dead_letters, ADMIN, CONTROL, READ};
use common::{order_mail, wait_for, Workspace};
use http_body_util::BodyExt;
use mail_order_bot::compose::{build_runtime, control_config, load_config};
use mail_order_bot::module::MailOrderModule;
use serde_json::{json, Value};
use tower::ServiceExt;

fn json_body(v: Value) -> Option<(&'static str, Vec<u8>)> {
    Some(("application/json", v.to_string().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_and_every_bad_request_gets_a_json_error() {
    let logs = runtime_core::install_subscriber("info");
    let p = plane(logs).await;
    let app = &p.app;

    // Health is open; the rest needs a token.
    let live = call(app, "GET", "/health/live", None, None).await;
    assert_eq!(live.status, StatusCode::OK, "{}", live.text);
    assert_eq!(live.json()["healthy"], true);
    let ready = call(app, "GET", "/health/ready", None, None).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text);

    let no_token = call(app, "GET", "/status", None, None).await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        no_token.headers["www-authenticate"],
        "Bearer realm=\"plba\""
    );
    assert_eq!(no_token.code(), "unauthorized");
    let wrong = call(app, "GET", "/status", Some("nope"), None).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(
        !wrong.text.contains("read-token-1-7c1f0e9b2d4a6f835e21"),
        "secrets never appear in a response"
    );

    let status = call(app, "GET", "/status", READ, None).await;
    assert_eq!(status.status, StatusCode::OK);
    let s = status.json();
    assert_eq!(s["state"], "running");
    assert_eq!(s["pools"][0]["name"], "orders");
    assert_eq!(s["sources"]["inbox"]["paused"], false);
    assert!(s["queues"]["orders"]["depth"].is_number());

    let metrics = call(app, "GET", "/metrics", READ, None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.headers["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/plain"));
    assert!(
        metrics.text.contains("plba_queue_depth{name=\"orders\"}"),
        "{}",
        metrics.text
    );
    assert!(metrics
        .text
        .contains("plba_source_last_event_age_seconds{name=\"inbox\"}"));

    // Admin routes refuse a read token.
    let forbidden = call(app, "POST", "/sources/inbox/pause", READ, None).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(forbidden.code(), "forbidden");

    // Pause: readiness turns down with the reason, then up again.
    let paused = call(app, "POST", "/sources/inbox/pause", ADMIN, None).await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text);
    let not_ready = call(app, "GET", "/health/ready", None, None).await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    // Open health says what is down; why (hosts, users, errors) only to a token's holder.
    assert!(
        !not_ready.text.contains("source inbox is paused")
            && not_ready.text.contains("a read token shows why"),
        "{}",
        not_ready.text
    );
    let why = call(app, "GET", "/health/ready", READ, None).await;
    assert_eq!(why.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(why.text.contains("source inbox is paused"), "{}", why.text);
    assert_eq!(
        call(app, "GET", "/status", READ, None).await.json()["sources"]["inbox"]["paused"],
        true
    );
    assert_eq!(
        call(app, "POST", "/sources/inbox/resume", ADMIN, None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        call(app, "GET", "/health/ready", None, None).await.status,
        StatusCode::OK
    );
    let unknown_source = call(app, "POST", "/sources/nope/pause", ADMIN, None).await;
    assert_eq!(
        (unknown_source.status, unknown_source.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );

    // Unknown route, wrong method, bad parameters.
    let unknown = call(app, "GET", "/nope", READ, None).await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let method = call(app, "DELETE", "/status", ADMIN, None).await;
    assert_eq!(
        (method.status, method.code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let bad_path = call(app, "POST", "/sources/%FF%FE/pause", ADMIN, None).await;
    assert_eq!(
        (bad_path.status, bad_path.code().as_str()),
        (StatusCode::BAD_REQUEST, "bad_path_parameter")
    );
    let bad_query = call(
        app,
        "GET",
        "/queues/orders/dead-letters?limit=many",
        READ,
        None,
    )
    .await;
    assert_eq!(
        (bad_query.status, bad_query.code().as_str()),
        (StatusCode::BAD_REQUEST, "bad_query_parameter")
    );
    let bad_limit = call(
        app,
        "GET",
        "/queues/orders/dead-letters?limit=0",
        READ,
        None,
    )
    .await;
    assert_eq!(bad_limit.status, StatusCode::BAD_REQUEST);
    let no_queue = call(app, "GET", "/queues/nope/dead-letters", READ, None).await;
    assert_eq!(no_queue.status, StatusCode::NOT_FOUND);

    // Bodies: invalid JSON, wrong content type, wrong fields, too large.
    let invalid = call(
        app,
        "POST",
        "/loggers",
        ADMIN,
        Some(("application/json", b"{not json".to_vec())),
    )
    .await;
    assert_eq!(
        (invalid.status, invalid.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );
    let wrong_type = call(
        app,
        "POST",
        "/loggers",
        ADMIN,
        Some(("text/plain", b"{\"filter\":\"info\"}".to_vec())),
    )
    .await;
    assert_eq!(
        (wrong_type.status, wrong_type.code().as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let wrong_field = call(
        app,
        "POST",
        "/loggers",
        ADMIN,
        json_body(json!({"level": "info"})),
    )
    .await;
    assert_eq!(
        (wrong_field.status, wrong_field.code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    let big = json!({"filter": "x".repeat(4096)});
    let too_large = call(app, "POST", "/loggers", ADMIN, json_body(big)).await;
    assert_eq!(
        (too_large.status, too_large.code().as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    // Log levels at run time.
    assert_eq!(
        call(app, "GET", "/loggers", READ, None).await.json()["filter"],
        "info"
    );
    let bad_filter = call(
        app,
        "POST",
        "/loggers",
        ADMIN,
        json_body(json!({"filter": "info,[unclosed"})),
    )
    .await;
    assert_eq!(
        (bad_filter.status, bad_filter.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_log_filter")
    );
    let set = call(
        app,
        "POST",
        "/loggers",
        ADMIN,
        json_body(json!({"filter": "warn,mail_order_bot=debug"})),
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text);
    assert_eq!(
        call(app, "GET", "/loggers", READ, None).await.json()["filter"],
        "warn,mail_order_bot=debug"
    );

    // Configuration, secrets redacted.
    let config = call(app, "GET", "/config", READ, None).await;
    assert_eq!(config.status, StatusCode::OK);
    assert_eq!(config.json()["control"]["admin_tokens"], "[redacted]");
    assert!(
        !config.text.contains("admin-token-1-4b8e2d6f0a3c9e17b5d2")
            && !config.text.contains("read-token-1-7c1f0e9b2d4a6f835e21")
    );

    // Dead-letter routes on an empty store.
    let list = call(app, "GET", "/queues/orders/dead-letters", READ, None).await;
    assert_eq!(list.json(), json!({"items": [], "next_cursor": null}));
    let missing = call(app, "GET", "/queues/orders/dead-letters/nope", READ, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        call(
            app,
            "POST",
            "/queues/orders/dead-letters/nope/replay",
            ADMIN,
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(
            app,
            "DELETE",
            "/queues/orders/dead-letters/nope",
            ADMIN,
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    let none = call(
        app,
        "POST",
        "/queues/orders/dead-letters/replay",
        ADMIN,
        json_body(json!({})),
    )
    .await;
    assert_eq!(none.json(), json!({"replayed": [], "more": false}));

    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_every_matching_dead_letter_is_done_a_bounded_number_at_a_time() {
    let p = plane(None).await;
    three_fixed_dead_letters(&p).await;
    let path = "/queues/orders/dead-letters/replay";
    for limit in [0, 10_001] {
        let bad = call(
            &p.app,
            "POST",
            path,
            ADMIN,
            json_body(json!({"limit": limit})),
        )
        .await;
        assert_eq!(
            (bad.status, bad.code().as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            "{}",
            bad.text
        );
    }
    let first = call(&p.app, "POST", path, ADMIN, json_body(json!({"limit": 2}))).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let first = first.json();
    assert_eq!(
        first["replayed"].as_array().map(Vec::len),
        Some(2),
        "{first}"
    );
    assert_eq!(first["more"], true, "{first}");
    p.ws.wait_for_orders(2).await;
    let rest = call(&p.app, "POST", path, ADMIN, json_body(json!({})))
        .await
        .json();
    assert_eq!(rest["replayed"].as_array().map(Vec::len), Some(1), "{rest}");
    assert_eq!(rest["more"], false, "{rest}");
    p.ws.wait_for_orders(3).await;
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_exactly_the_routes_that_answer() {
    let p = plane(None).await;
    let doc = call(&p.app, "GET", "/openapi.json", READ, None)
        .await
        .json();
    assert_eq!(doc, runtime_adapters::control::openapi_document());
    let paths = doc["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, methods) in paths {
        for (method, op) in methods.as_object().expect("methods") {
            operations += 1;
            let uri = path.replace("{queue}", "orders").replace("{id}", "x");
            let body = op
                .get("requestBody")
                .map(|_| ("application/json", b"{}".to_vec()));
            let reply = call(&p.app, &method.to_uppercase(), &uri, ADMIN, body).await;
            let routed = !(reply.status == StatusCode::NOT_FOUND
                && reply.text.contains("no such route"))
                && reply.status != StatusCode::METHOD_NOT_ALLOWED;
            assert!(
                routed,
                "{method} {path} is documented but not routed: {} {}",
                reply.status, reply.text
            );
            let secured = op.get("security").is_some();
            let anonymous = call(&p.app, &method.to_uppercase(), &uri, None, None).await;
            assert_eq!(
                anonymous.status == StatusCode::UNAUTHORIZED,
                secured,
                "{method} {path}: documented security differs from what the route does"
            );
        }
    }
    assert!(operations >= 16, "{operations} operations documented");
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rejects_a_bad_edit_whole_and_applies_a_good_one_live() {
    let p = plane(None).await;
    let app = &p.app;
    let status = call(app, "GET", "/status", READ, None).await.json();
    assert_eq!(status["pools"][0]["workers"], 2);

    // One edit with a good change and a bad one: rejected as a whole.
    let text =
        p.ws.config_text(5, 2, CONTROL)
            .replace("jitter = 0.1", "jitter = 7.0");
    std::fs::write(&p.config_path, text).expect("write");
    let rejected = call(app, "POST", "/config/reload", ADMIN, None).await;
    assert_eq!(
        (rejected.status, rejected.code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config")
    );
    assert!(
        rejected.text.contains("pools.orders.retry.jitter"),
        "{}",
        rejected.text
    );
    assert_eq!(
        call(app, "GET", "/status", READ, None).await.json()["pools"][0]["workers"],
        2,
        "nothing changed"
    );

    // A valid edit: applied live, visible in /status; a restart-only key is reported.
    let text =
        p.ws.config_text(5, 2, CONTROL)
            .replace("capacity = 100000", "capacity = 5000");
    std::fs::write(&p.config_path, text).expect("write");
    let applied = call(app, "POST", "/config/reload", ADMIN, None).await;
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.text);
    let report = applied.json();
    assert_eq!(report["applied"], json!(["pools.orders.workers"]));
    assert_eq!(report["needs_restart"], json!(["queue.capacity"]));
    assert_eq!(
        call(app, "GET", "/status", READ, None).await.json()["pools"][0]["workers"],
        5
    );
    p.runtime.shutdown().await;
}

/// A minimal HTTP/1.1 client for the real-port test.
fn http(addr: &str, method: &str, path: &str, token: &str) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_real_port_a_dead_letter_is_replayed_after_its_fault_is_fixed() {
    let ws = Workspace::new();
    let control = "\n[control]\nenabled = true\nbind = \"127.0.0.1:0\"\n";
    let config = ws.config_with(2, 2, control);
    // The fault: the order database refuses one article, as a failing ERP would.
    ws.store().await;
    let db = refuse_sku_666(&ws).await;
    ws.deliver(
        "1.good",
        &order_mail("good", "purchasing@acme.example", &[("SKU-1", 1)]),
    );
    ws.deliver(
        "2.bad",
        &order_mail("bad", "purchasing@acme.example", &[("SKU-666", 3)]),
    );

    let (mut bot, addr) = common::plane::spawn_with_control(
        &config,
        &[(
            "PLBA_CONTROL_ADMIN_TOKENS",
            "e2e-admin-8d3f1b7e2a9c4d6f0b5e1a27",
        )],
    );

    assert_eq!(http(&addr, "GET", "/health/live", "").0, 200);
    let dead_id = {
        let addr = addr.clone();
        let found = std::sync::Arc::new(std::sync::Mutex::new(None));
        let sink = found.clone();
        wait_for(
            Duration::from_secs(60),
            "the failing message to be dead-lettered",
            || {
                let (addr, sink) = (addr.clone(), sink.clone());
                async move {
                    let (status, page) = http(
                        &addr,
                        "GET",
                        "/queues/orders/dead-letters",
                        "e2e-admin-8d3f1b7e2a9c4d6f0b5e1a27",
                    );
                    let id = page["items"][0]["id"].as_str().map(str::to_owned);
                    *sink.lock().expect("lock") = id.clone();
                    status == 200 && id.is_some()
                }
            },
        )
        .await;
        let id = found.lock().expect("lock").clone().expect("id");
        id
    };
    assert_eq!(dead_id, "maildir:inbox:2.bad");
    let (_, one) = http(
        &addr,
        "GET",
        &format!("/queues/orders/dead-letters/{dead_id}"),
        "e2e-admin-8d3f1b7e2a9c4d6f0b5e1a27",
    );
    assert!(
        one["reason"]
            .as_str()
            .unwrap_or("")
            .contains("ERP rejected SKU-666"),
        "{one}"
    );
    assert_eq!(one["task"]["history"].as_array().map(Vec::len), Some(2));
    assert!(
        !ws.seen_flags()["2.bad"],
        "the failing message stays unread"
    );
    assert_eq!(
        http(
            &addr,
            "POST",
            &format!("/queues/orders/dead-letters/{dead_id}/replay"),
            "wrong"
        )
        .0,
        401
    );

    // Fix the fault, replay through the API, and the order appears.
    sqlx::query("DROP TRIGGER erp_down")
        .execute(&db)
        .await
        .expect("fix");
    let (status, body) = http(
        &addr,
        "POST",
        &format!("/queues/orders/dead-letters/{dead_id}/replay"),
        "e2e-admin-8d3f1b7e2a9c4d6f0b5e1a27",
    );
    assert_eq!(status, 200, "{body}");
    wait_for(Duration::from_secs(60), "the replayed order", || async {
        let orders = ws.store().await.orders_after(0).await.expect("orders");
        orders
            .iter()
            .any(|o| o.lines.iter().any(|l| l.sku == "SKU-666"))
    })
    .await;
    wait_for(
        Duration::from_secs(10),
        "the message to be marked seen",
        || async { ws.seen_flags()["2.bad"] },
    )
    .await;
    let (_, page) = http(
        &addr,
        "GET",
        "/queues/orders/dead-letters",
        "e2e-admin-8d3f1b7e2a9c4d6f0b5e1a27",
    );
    assert_eq!(page["items"], json!([]));
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    let bad: Vec<_> = outcomes
        .iter()
        .filter(|o| o.message_identity == "mid:bad@test.example")
        .collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(
        bad[0].outcome, "created",
        "the failed outcome was replaced by the order"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(bot.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sigterm");
    assert!(bot.wait().expect("wait").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out_and_excess_ones_are_shed_with_retry_after() {
    let ws = Workspace::new();
    let extra =
        "\n[control]\nenabled = true\nmax_concurrent_requests = 1\nrequest_timeout_ms = 300\n";
    let path = ws.config_with(1, 2, extra);
    let manager = Arc::new(load_config(Some(&path), Some(HashMap::new())).expect("config"));
    let cfg = control_config(manager.root().get("control")).expect("control");
    let mut runtime = build_runtime(manager, Arc::new(MailOrderModule), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    let runtime = Arc::new(runtime);
    let app = runtime_adapters::control::router(Arc::clone(&runtime), &cfg);

    // A request whose body never arrives holds the only slot until it times out.
    let (polled_tx, polled_rx) = tokio::sync::oneshot::channel::<()>();
    let stalled_body = futures::stream::once(async move {
        let _ = polled_tx.send(());
        std::future::pending::<Result<axum::body::Bytes, std::io::Error>>().await
    });
    let stalled = Request::builder()
        .method("POST")
        .uri("/loggers")
        .header("content-type", "application/json")
        .body(Body::from_stream(stalled_body))
        .expect("request");
    let first = tokio::spawn(app.clone().oneshot(stalled));
    polled_rx
        .await
        .expect("the stalled request reached its handler");

    let shed = call(&app, "GET", "/status", None, None).await;
    assert_eq!(
        (shed.status, shed.code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
    );
    assert_eq!(shed.headers["retry-after"], "1");
    // Health is not under the shared limit: a full plane is not a dead process.
    for path in ["/health/live", "/health/ready"] {
        let health = call(&app, "GET", path, None, None).await;
        assert_ne!(
            health.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {}",
            health.text
        );
    }

    let timed_out = first.await.expect("join").expect("infallible");
    assert_eq!(timed_out.status(), StatusCode::REQUEST_TIMEOUT);
    let body = timed_out
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let v: Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(v["error"]["code"], "request_timeout");

    // The slot is free again.
    assert_eq!(
        call(&app, "GET", "/status", None, None).await.status,
        StatusCode::OK
    );
    runtime.shutdown().await;
}

/// A plane without tokens (loopback only) answers only requests for a loopback host name
/// (a page whose name was rebound to 127.0.0.1 sends its own), and no plane takes a
/// state-changing request from another site, tokens or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_other_sites_and_rebound_names_are_refused() {
    let open = common::plane::plane_with(
        None,
        "\n[control]\nenabled = true\nbind = \"127.0.0.1:0\"\n",
    )
    .await;
    let with_host = |method: &str, path: &str, host: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .body(Body::empty())
            .expect("request")
    };
    for host in [
        "attacker.example",
        "attacker.example:8080",
        "192.0.2.7:8080",
    ] {
        let reply = common::plane::exchange(&open.app, with_host("GET", "/status", host)).await;
        assert_eq!(
            (reply.status, reply.code().as_str()),
            (StatusCode::FORBIDDEN, "forbidden_host"),
            "{host}"
        );
    }
    for host in ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"] {
        let reply = common::plane::exchange(&open.app, with_host("GET", "/status", host)).await;
        assert_eq!(reply.status, StatusCode::OK, "{host}: {}", reply.text);
    }
    // A cross-site form post (no body, no token: a "simple" request any page can make).
    let cross = |site: Option<&str>, origin: Option<&str>| {
        let mut req = Request::builder()
            .method("POST")
            .uri("/sources/inbox/pause")
            .header("host", "127.0.0.1:8080");
        if let Some(site) = site {
            req = req.header("sec-fetch-site", site);
        }
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        req.body(Body::empty()).expect("request")
    };
    for (site, origin) in [
        (Some("cross-site"), None),
        (Some("same-site"), Some("http://127.0.0.1:3000")),
        (None, Some("http://attacker.example")),
        (None, Some("null")),
    ] {
        let reply = common::plane::exchange(&open.app, cross(site, origin)).await;
        assert_eq!(
            (reply.status, reply.code().as_str()),
            (StatusCode::FORBIDDEN, "cross_site"),
            "{site:?} {origin:?}"
        );
    }
    assert!(!open.runtime.status().await.sources["inbox"].paused);
    // The console itself (same origin) and a client that is not a browser may act.
    let reply = common::plane::exchange(
        &open.app,
        cross(Some("same-origin"), Some("http://127.0.0.1:8080")),
    )
    .await;
    assert!(reply.status.is_success(), "{}", reply.text);
    assert!(open.runtime.status().await.sources["inbox"].paused);
    open.runtime.shutdown().await;

    // With tokens, any Host is answered (the token is the boundary), but a cross-site
    // request is refused even with a valid token.
    let guarded = common::plane::plane(None).await;
    let mut req = with_host("GET", "/status", "orders.internal.example:8080");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", common::plane::READ.unwrap_or_default())
            .parse()
            .expect("header"),
    );
    assert_eq!(
        common::plane::exchange(&guarded.app, req).await.status,
        StatusCode::OK
    );
    let mut req = cross(Some("cross-site"), Some("http://attacker.example"));
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", common::plane::ADMIN.unwrap_or_default())
            .parse()
            .expect("header"),
    );
    assert_eq!(
        common::plane::exchange(&guarded.app, req).await.status,
        StatusCode::FORBIDDEN
    );
    guarded.runtime.shutdown().await;
}

/// Every request that changes something is logged with the token that made it (its label:
/// role, place, the first digits of its hash; never the token), and wrong tokens from one
/// address are counted: beyond ten a minute, no token from there is checked (`429` with
/// `Retry-After`), so guessing is slowed without a request ever waiting in a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_name_their_token_and_wrong_tokens_are_throttled_per_address() {
    let ws = Workspace::new();
    let config = ws.config_with(2, 2, common::plane::CONTROL);
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (mut bot, addr) =
        common::plane::spawn_with_control_logs(&config, &[], Some(Arc::clone(&logs)));
    let admin = common::plane::ADMIN.unwrap_or_default();
    let (status, _) = http(&addr, "POST", "/sources/inbox/pause", admin);
    assert_eq!(status, 200);
    common::wait_for(Duration::from_secs(10), "the action's log line", || {
        let logs = Arc::clone(&logs);
        async move {
            logs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|l| {
                    l.contains("operator request")
                        && l.contains("admin token 1 (sha256 ")
                        && l.contains("/sources/inbox/pause")
                })
        }
    })
    .await;
    assert!(
        !logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(admin)),
        "the token itself is never logged"
    );

    for n in 0..10 {
        let (status, body) = http(&addr, "GET", "/status", &format!("wrong-token-{n}"));
        assert_eq!(status, 401, "{body}");
    }
    let (status, body) = http(&addr, "GET", "/status", "wrong-token-10");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_failures")),
        "{body}"
    );
    // Not checked at all while blocked, right or wrong: a guess learns nothing.
    let (status, _) = http(
        &addr,
        "GET",
        "/status",
        common::plane::READ.unwrap_or_default(),
    );
    assert_eq!(status, 429);
    // Health stays open to probes.
    let (status, _) = http(&addr, "GET", "/health/live", "");
    assert_eq!(status, 200);
    let _ = bot.kill();
    let _ = bot.wait();
}

/// The metric names a text mentions (`plba_…`), as their families: without the `_total`,
/// `_bucket`, `_sum` and `_count` of their samples.
fn metric_families(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for (at, _) in text.match_indices("plba_") {
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        names.insert(family.to_owned());
    }
    names
}

/// `deploy/prometheus/alerts.yml` passes `promtool check rules` and its unit tests
/// (`promtool test rules`), and it and the Grafana dashboard name only metric families the
/// bot exposes: a renamed metric cannot leave an alert that never fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_pass_promtool_and_name_only_metrics_the_bot_exposes() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let promtool = plba_testkit::find("promtool", "apt-get install prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(deploy.join("prometheus"))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let plane = plane(None).await;
    // Families appear with their first sample: one order, and one that fails every attempt
    // (the database refuses its article) for the failure families.
    let _db = refuse_sku_666(&plane.ws).await;
    plane.ws.deliver(
        "metrics.1",
        &order_mail("metrics-1", "purchasing@acme.example", &[("SKU-1", 2)]),
    );
    plane.ws.deliver(
        "metrics.2",
        &order_mail("metrics-2", "purchasing@acme.example", &[("SKU-666", 1)]),
    );
    // Waited for in the metrics themselves: the pool's own counters move a moment earlier.
    wait_for(Duration::from_secs(30), "both tasks settled", || async {
        let text = plane.runtime.metrics_text().await;
        text.contains("plba_task_latency_seconds_count{queue=\"orders\",kind=\"mail.message\"} 1")
            && text.contains(
                "plba_dead_letters_by_class_total{queue=\"orders\",kind=\"mail.message\",class=\"error\"} 1",
            )
    })
    .await;
    let text = plane.runtime.metrics_text().await;
    let exposed: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    // Gauges read at scrape time: readiness (whole and per check) and the oldest lease.
    for sample in [
        "plba_ready 1",
        "plba_readiness_check{name=\"inbox\"} 1",
        "plba_queue_oldest_pending_age_seconds{name=\"orders\"} 0",
        // Publish to outcome, from the header the runtime stamps at publish.
        "plba_task_latency_seconds_count{queue=\"orders\",kind=\"mail.message\"} 1",
        "plba_task_latency_seconds_bucket{le=\"30.0\",queue=\"orders\",kind=\"mail.message\"} 1",
        // The refused article: retried once (max_attempts = 2), then dead-lettered.
        "plba_retries_by_class_total{queue=\"orders\",kind=\"mail.message\",class=\"error\"} 1",
        "plba_dead_letters_by_class_total{queue=\"orders\",kind=\"mail.message\",class=\"error\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(sample)),
            "no {sample}:\n{text}"
        );
    }
    let dashboard =
        std::fs::read_to_string(deploy.join("grafana/plba-dashboard.json")).expect("dashboard");
    let panels = serde_json::from_str::<Value>(&dashboard).expect("dashboard JSON")["panels"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(panels >= 8, "{panels} panels");
    for file in ["prometheus/alerts.yml", "grafana/plba-dashboard.json"] {
        let named = metric_families(&std::fs::read_to_string(deploy.join(file)).expect("read"));
        assert!(named.len() >= 5, "{file} names {named:?}");
        for family in &named {
            assert!(
                exposed.contains(family.as_str()),
                "{file} names {family}, which the bot does not expose:\n{text}"
            );
        }
    }
}
