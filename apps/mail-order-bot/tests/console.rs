//! The operator console (`/ui`) in process: every page and action, login and sessions,
//! CSRF, confirmations, read against admin, expired sessions and unknown ids, over a running
//! bot (Maildir, in-memory queue, SQLite).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::plane::{self, plane, plane_with, refuse_sku_666, Reply, CONTROL};
use common::{order_mail, wait_for};

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The value of the first `name="<field>" value="..."` in a page.
fn field(page: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.find(&marker)? + marker.len();
    let end = page[start..].find('"')?;
    Some(page[start..start + end].to_owned())
}

/// A client that keeps cookies, like a browser.
struct Client<'a> {
    app: &'a Router,
    cookies: HashMap<String, String>,
}

impl<'a> Client<'a> {
    fn new(app: &'a Router) -> Self {
        Self {
            app,
            cookies: HashMap::new(),
        }
    }

    async fn send(&mut self, method: &str, uri: &str, form: Option<&[(&str, &str)]>) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header("cookie", jar.join("; "));
        }
        let body = match form {
            Some(fields) => {
                req = req.header("content-type", "application/x-www-form-urlencoded");
                let text: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                    .collect();
                Body::from(text.join("&"))
            }
            None => Body::empty(),
        };
        let reply = plane::exchange(self.app, req.body(body).expect("request")).await;
        for value in reply.headers.get_all("set-cookie") {
            let value = value.to_str().expect("ascii cookie");
            let pair = value.split(';').next().unwrap_or_default();
            if let Some((k, v)) = pair.split_once('=') {
                if v.is_empty() || value.contains("Max-Age=0") {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        reply
    }

    async fn get(&mut self, uri: &str) -> Reply {
        self.send("GET", uri, None).await
    }

    async fn post(&mut self, uri: &str, form: &[(&str, &str)]) -> Reply {
        self.send("POST", uri, Some(form)).await
    }

    /// Logs in with `token`; panics unless it works.
    async fn login(&mut self, token: &str) {
        let form = self.get("/ui/login").await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.text);
        let nonce = field(&form.text, "csrf").expect("the login form's CSRF field");
        let done = self
            .post("/ui/login", &[("csrf", &nonce), ("token", token)])
            .await;
        assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.text);
        assert_eq!(done.headers["location"], "/ui");
    }

    /// The session's CSRF token, from the logout form of the overview.
    async fn csrf(&mut self) -> String {
        let page = self.get("/ui").await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        field(&page.text, "csrf").expect("a CSRF field")
    }
}

fn location(r: &Reply) -> String {
    r.headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sessions_csrf_and_roles_guard_every_page_and_action() {
    let p = plane(None).await;
    let mut anon = Client::new(&p.app);

    // Closed without a session; the assets and the login form are open.
    let closed = anon.get("/ui").await;
    assert_eq!(closed.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&closed), "/ui/login");
    for page in [
        "/ui/dead-letters",
        "/ui/config",
        "/ui/loggers",
        "/ui/app/orders",
    ] {
        assert_eq!(location(&anon.get(page).await), "/ui/login", "{page}");
    }
    let css = anon.get("/ui/static/app.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.headers["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/css"));
    let form = anon.get("/ui/login").await;
    assert_eq!(form.status, StatusCode::OK);
    let csp = form.headers["content-security-policy"]
        .to_str()
        .unwrap_or("");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(form.headers["x-frame-options"], "DENY");
    let login_cookie = form.headers["set-cookie"].to_str().unwrap_or("");
    assert!(
        login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Strict"),
        "{login_cookie}"
    );
    let nonce = field(&form.text, "csrf").expect("nonce");

    // The login form's own CSRF check: a post without its cookie is refused.
    let mut foreign = Client::new(&p.app);
    let forged = foreign
        .post(
            "/ui/login",
            &[
                ("csrf", &nonce),
                ("token", "admin-token-1-4b8e2d6f0a3c9e17b5d2"),
            ],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN, "{}", forged.text);
    assert!(!foreign.cookies.contains_key("plba_session"));
    let wrong = anon
        .post("/ui/login", &[("csrf", &nonce), ("token", "guess")])
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.text.contains("not valid"), "{}", wrong.text);
    assert!(!anon.cookies.contains_key("plba_session"));

    // A read session: it sees everything, with no action buttons, and cannot act.
    let mut reader = Client::new(&p.app);
    reader.login("read-token-1-7c1f0e9b2d4a6f835e21").await;
    let session = reader.cookies["plba_session"].clone();
    assert_eq!(session.len(), 64, "a 256-bit random session id");
    let overview = reader.get("/ui").await;
    assert_eq!(overview.status, StatusCode::OK);
    assert!(overview.headers["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/html"));
    for part in [
        "id=\"sources\"",
        "id=\"pools\"",
        "id=\"queues\"",
        "id=\"readiness\"",
        "Last 15 minutes",
        "<svg",
        "data-source=\"inbox\"",
        "Signed in: read",
    ] {
        assert!(overview.text.contains(part), "{part} in {}", overview.text);
    }
    assert!(!overview.text.contains("/ui/sources/inbox/pause"));
    for secret in [
        "read-token-1-7c1f0e9b2d4a6f835e21",
        "admin-token-1-4b8e2d6f0a3c9e17b5d2",
    ] {
        assert!(!overview.text.contains(secret));
    }
    let live = reader.get("/ui/live").await;
    assert_eq!(live.status, StatusCode::OK);
    assert!(live.text.contains("id=\"pools\"") && !live.text.contains("<html"));
    let csrf = reader.csrf().await;
    let refused = reader
        .post(
            "/ui/sources/inbox/pause",
            &[("csrf", &csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.text.contains("admin token"), "{}", refused.text);
    assert!(!p.runtime.status().await.sources["inbox"].paused);
    let config = reader.get("/ui/config").await;
    assert_eq!(config.status, StatusCode::OK);
    assert!(config.text.contains("[redacted]"), "{}", config.text);
    assert!(!config.text.contains("admin-token-1-4b8e2d6f0a3c9e17b5d2"));
    assert!(!config.text.contains("/ui/config/reload"));
    let loggers = reader.get("/ui/loggers").await;
    assert_eq!(loggers.status, StatusCode::OK);

    // An admin session: CSRF first, then a confirmation, then the action.
    let mut admin = Client::new(&p.app);
    admin.login("admin-token-1-4b8e2d6f0a3c9e17b5d2").await;
    let csrf = admin.csrf().await;
    let overview = admin.get("/ui").await;
    assert!(overview.text.contains("/ui/sources/inbox/pause"));
    let no_csrf = admin
        .post("/ui/sources/inbox/pause", &[("confirm", "yes")])
        .await;
    assert_eq!(no_csrf.status, StatusCode::FORBIDDEN);
    assert!(no_csrf.text.contains("CSRF"), "{}", no_csrf.text);
    let other_csrf = admin
        .post(
            "/ui/sources/inbox/pause",
            &[("csrf", &"0".repeat(64)), ("confirm", "yes")],
        )
        .await;
    assert_eq!(other_csrf.status, StatusCode::FORBIDDEN);
    // The reader's token is not the admin's.
    let reader_csrf = reader.csrf().await;
    assert_ne!(reader_csrf, csrf);
    let crossed = admin
        .post(
            "/ui/sources/inbox/pause",
            &[("csrf", &reader_csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(crossed.status, StatusCode::FORBIDDEN);
    assert!(!p.runtime.status().await.sources["inbox"].paused);

    let ask = admin
        .post("/ui/sources/inbox/pause", &[("csrf", &csrf)])
        .await;
    assert_eq!(ask.status, StatusCode::OK);
    assert!(ask.text.contains("Pause source inbox?"), "{}", ask.text);
    assert!(ask.text.contains("name=\"confirm\" value=\"yes\""));
    assert!(
        !p.runtime.status().await.sources["inbox"].paused,
        "nothing happens before the confirmation"
    );
    let done = admin
        .post(
            "/ui/sources/inbox/pause",
            &[("csrf", &csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&done), "/ui");
    assert!(p.runtime.status().await.sources["inbox"].paused);
    let after = admin.get("/ui").await;
    assert!(
        after.text.contains("Source inbox is paused."),
        "{}",
        after.text
    );
    assert!(after.text.contains("/ui/sources/inbox/resume"));
    let again = admin.get("/ui").await;
    assert!(
        !again.text.contains("Source inbox is paused."),
        "a notice shows once"
    );
    let resumed = admin
        .post(
            "/ui/sources/inbox/resume",
            &[("csrf", &csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(resumed.status, StatusCode::SEE_OTHER);
    assert!(!p.runtime.status().await.sources["inbox"].paused);

    // Unknown pages, ids and bad filters.
    for (uri, status) in [
        ("/ui/nothing-here", StatusCode::NOT_FOUND),
        ("/ui/app/nothing", StatusCode::NOT_FOUND),
        (
            "/ui/app/outcomes?item=mid%3Anobody%40x",
            StatusCode::NOT_FOUND,
        ),
        ("/ui/app/outcomes?from=yesterday", StatusCode::BAD_REQUEST),
        ("/ui/app/outcomes?outcome=bogus", StatusCode::BAD_REQUEST),
        ("/ui/dead-letters/orders/no-such-id", StatusCode::NOT_FOUND),
        ("/ui/dead-letters/no-queue/x", StatusCode::NOT_FOUND),
    ] {
        let r = admin.get(uri).await;
        assert_eq!(r.status, status, "{uri}: {}", r.text);
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap_or("")
                .starts_with("text/html"),
            "{uri} answers a page"
        );
    }
    for uri in [
        "/ui/dead-letters/orders/no-such-id/replay",
        "/ui/dead-letters/orders/no-such-id/delete",
        "/ui/sources/no-such-source/pause",
    ] {
        let r = admin
            .post(uri, &[("csrf", &csrf), ("confirm", "yes")])
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}: {}", r.text);
    }
    let api = admin.get("/status").await;
    assert_eq!(
        api.status,
        StatusCode::UNAUTHORIZED,
        "a console session is no bearer token for the API"
    );

    // Logging out ends the session for good.
    let out = admin.post("/ui/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&out), "/ui/login");
    let mut replayed = Client::new(&p.app);
    replayed
        .cookies
        .insert("plba_session".into(), session.clone());
    assert_eq!(replayed.get("/ui").await.status, StatusCode::OK);
    let mut stale = Client::new(&p.app);
    stale.cookies.insert("plba_session".into(), "0".repeat(64));
    assert_eq!(location(&stale.get("/ui").await), "/ui/login?expired=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_expires_and_must_log_in_again() {
    let control = format!("{CONTROL}ui_session_idle_secs = 1\n");
    let p = plane_with(None, &control).await;
    let mut admin = Client::new(&p.app);
    admin.login("admin-token-1-4b8e2d6f0a3c9e17b5d2").await;
    let csrf = admin.csrf().await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let page = admin.get("/ui").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&page), "/ui/login?expired=1");
    let form = admin.get("/ui/login?expired=1").await;
    assert!(
        form.text.contains("Your session has ended"),
        "{}",
        form.text
    );
    let act = admin
        .post(
            "/ui/sources/inbox/pause",
            &[("csrf", &csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(act.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&act), "/ui/login?expired=1");
    assert!(!p.runtime.status().await.sources["inbox"].paused);
    let live = admin.get("/ui/live").await;
    assert_eq!(live.status, StatusCode::UNAUTHORIZED);

    // The live panel's polling (every 2 s from an open tab) does not keep a session alive.
    admin.login("admin-token-1-4b8e2d6f0a3c9e17b5d2").await;
    let polled_until = std::time::Instant::now() + Duration::from_millis(1_500);
    let mut polls = 0;
    while std::time::Instant::now() < polled_until {
        let live = admin.get("/ui/live").await;
        if live.status != StatusCode::OK {
            break;
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(polls >= 2, "the panel answered while the session lived");
    assert_eq!(location(&admin.get("/ui").await), "/ui/login?expired=1");
}

/// Off loopback the session cookie is `Secure` whatever `ui_secure_cookie` says: it must
/// never cross the network in clear text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_secure_off_loopback() {
    let control = CONTROL.replace("bind = \"127.0.0.1:0\"", "bind = \"0.0.0.0:0\"");
    assert!(control.contains("0.0.0.0"), "{control}");
    let p = plane_with(None, &control).await;
    let mut admin = Client::new(&p.app);
    let form = admin.get("/ui/login").await;
    let nonce = field(&form.text, "csrf").expect("csrf");
    let done = admin
        .post(
            "/ui/login",
            &[
                ("csrf", &nonce),
                ("token", "admin-token-1-4b8e2d6f0a3c9e17b5d2"),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.text);
    let cookies: Vec<&str> = done
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(!cookies.is_empty());
    assert!(
        cookies.iter().all(|c| c.contains("; Secure")),
        "{cookies:?}"
    );
    let local = plane_with(None, CONTROL).await;
    let form = Client::new(&local.app).get("/ui/login").await;
    let cookie = form.headers["set-cookie"].to_str().unwrap_or("");
    assert!(!cookie.contains("Secure"), "{cookie}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_found_replayed_and_deleted_and_the_order_shows_in_the_bots_pages() {
    let p = plane(None).await;
    p.ws.store().await;
    let db = refuse_sku_666(&p.ws).await;
    p.ws.deliver(
        "1.good",
        &order_mail("good", "purchasing@acme.example", &[("SKU-1", 2)]),
    );
    p.ws.deliver(
        "2.bad",
        &order_mail("bad", "purchasing@acme.example", &[("SKU-666", 3)]),
    );
    p.ws.deliver(
        "3.worse",
        &order_mail("worse", "purchasing@acme.example", &[("SKU-666", 4)]),
    );
    wait_for(Duration::from_secs(60), "two dead letters", || async {
        p.runtime.status().await.queues["orders"].dead == 2
    })
    .await;

    let mut reader = Client::new(&p.app);
    reader.login("read-token-1-7c1f0e9b2d4a6f835e21").await;
    let mut admin = Client::new(&p.app);
    admin.login("admin-token-1-4b8e2d6f0a3c9e17b5d2").await;
    let csrf = admin.csrf().await;

    let list = reader.get("/ui/dead-letters").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(
        list.text.contains("2 matching dead letter(s)"),
        "{}",
        list.text
    );
    assert!(
        list.text.contains("maildir:inbox:2.bad") && list.text.contains("maildir:inbox:3.worse")
    );
    assert!(
        !list.text.contains("/ui/dead-letters/replay"),
        "a reader gets no replay button"
    );
    for (query, count) in [
        ("?reason=ERP+rejected", 2),
        ("?kind=no-such-kind", 0),
        ("?q=3.worse", 1),
        ("?queue=orders&q=SKU-666", 2),
    ] {
        let r = reader.get(&format!("/ui/dead-letters{query}")).await;
        assert!(
            r.text.contains(&format!("{count} matching dead letter(s)")),
            "{query}: {}",
            r.text
        );
    }
    let detail = reader
        .get("/ui/dead-letters/orders/maildir%3Ainbox%3A2.bad")
        .await;
    assert_eq!(detail.status, StatusCode::OK, "{}", detail.text);
    assert!(detail.text.contains("ERP rejected SKU-666"));
    assert_eq!(
        detail.text.matches("<td class=\"num\">").count(),
        2,
        "two failed attempts in the history: {}",
        detail.text
    );
    assert!(
        detail.text.contains("Next attempt at") && detail.text.contains("none: dead-lettered"),
        "when each retry was due, and that none followed the last: {}",
        detail.text
    );
    assert!(!detail.text.contains("not recorded"), "{}", detail.text);
    assert!(!detail.text.contains("/replay\""), "no replay for a reader");
    let reader_csrf = reader.csrf().await;
    let refused = reader
        .post(
            "/ui/dead-letters/orders/maildir%3Ainbox%3A2.bad/replay",
            &[("csrf", &reader_csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(p.runtime.status().await.queues["orders"].dead, 2);

    // Fix the fault, replay one from its page, and its order appears in the bot's pages.
    sqlx::query("DROP TRIGGER erp_down")
        .execute(&db)
        .await
        .expect("fix");
    let detail = admin
        .get("/ui/dead-letters/orders/maildir%3Ainbox%3A2.bad")
        .await;
    assert!(detail
        .text
        .contains("/ui/dead-letters/orders/maildir%3Ainbox%3A2.bad/replay"));
    let ask = admin
        .post(
            "/ui/dead-letters/orders/maildir%3Ainbox%3A2.bad/replay",
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(ask.status, StatusCode::OK);
    assert!(ask
        .text
        .contains("Put dead letter maildir:inbox:2.bad back"));
    let done = admin
        .post(
            "/ui/dead-letters/orders/maildir%3Ainbox%3A2.bad/replay",
            &[("csrf", &csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.text);
    assert_eq!(location(&done), "/ui/dead-letters");
    let after = admin.get("/ui/dead-letters").await;
    assert!(
        after.text.contains("was put back on queue orders"),
        "{}",
        after.text
    );
    wait_for(Duration::from_secs(60), "the replayed order", || async {
        p.ws.store()
            .await
            .orders_after(0)
            .await
            .expect("orders")
            .iter()
            .any(|o| {
                o.lines
                    .iter()
                    .any(|l| l.sku == "SKU-666" && l.quantity == 3)
            })
    })
    .await;
    let orders = reader.get("/ui/app/orders").await;
    assert_eq!(orders.status, StatusCode::OK);
    assert!(
        orders.text.contains("Orders, newest first (2 shown)"),
        "{}",
        orders.text
    );
    assert!(orders.text.contains("purchasing@acme.example"));
    let none = reader.get("/ui/app/orders?client=nobody-like-this").await;
    assert!(none.text.contains("(0 shown)"), "{}", none.text);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let dated = reader
        .get(&format!(
            "/ui/app/orders?client=ACME&from={today}&to={today}"
        ))
        .await;
    assert!(dated.text.contains("(2 shown)"), "{}", dated.text);
    let outcomes = reader.get("/ui/app/outcomes?outcome=created").await;
    assert!(outcomes.text.contains("(2 shown)"), "{}", outcomes.text);
    let message = reader
        .get("/ui/app/outcomes?item=mid%3Abad%40test.example")
        .await;
    assert_eq!(message.status, StatusCode::OK, "{}", message.text);
    for part in [
        "purchasing@acme.example",
        "SKU-666",
        "created",
        "Lines of order",
    ] {
        assert!(message.text.contains(part), "{part} in {}", message.text);
    }

    // The other one is deleted for good, after its confirmation.
    let delete = "/ui/dead-letters/orders/maildir%3Ainbox%3A3.worse/delete";
    let ask = admin.post(delete, &[("csrf", &csrf)]).await;
    assert!(ask.text.contains("for good"), "{}", ask.text);
    assert_eq!(p.runtime.status().await.queues["orders"].dead, 1);
    let gone = admin
        .post(delete, &[("csrf", &csrf), ("confirm", "yes")])
        .await;
    assert_eq!(gone.status, StatusCode::SEE_OTHER);
    assert_eq!(p.runtime.status().await.queues["orders"].dead, 0);
    let twice = admin
        .post(delete, &[("csrf", &csrf), ("confirm", "yes")])
        .await;
    assert_eq!(twice.status, StatusCode::NOT_FOUND);

    // The chart counts what ended.
    let overview = reader.get("/ui").await;
    assert!(
        overview
            .text
            .contains("id=\"activity-summary\">Tasks ended: 2; failed attempts: 4;"),
        "the good order and the replayed one; two attempts of each dead letter: {}",
        overview.text
    );
    assert!(overview.text.contains("<circle"), "a point on the chart");
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_matching_asks_first_and_replays_only_what_matches() {
    let p = plane(None).await;
    plane::three_fixed_dead_letters(&p).await;
    let mut admin = Client::new(&p.app);
    admin.login("admin-token-1-4b8e2d6f0a3c9e17b5d2").await;
    let csrf = admin.csrf().await;
    let list = admin.get("/ui/dead-letters?q=b.mail").await;
    assert!(list.text.contains("Replay all 1 matching"), "{}", list.text);
    let ask = admin
        .post(
            "/ui/dead-letters/replay",
            &[("csrf", &csrf), ("q", "b.mail")],
        )
        .await;
    assert_eq!(ask.status, StatusCode::OK);
    assert!(
        ask.text.contains("Put the 1 matching dead letter(s) back"),
        "{}",
        ask.text
    );
    assert_eq!(field(&ask.text, "q").as_deref(), Some("b.mail"));
    let done = admin
        .post(
            "/ui/dead-letters/replay",
            &[("csrf", &csrf), ("q", "b.mail"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER);
    wait_for(Duration::from_secs(60), "one replayed order", || async {
        p.ws.store()
            .await
            .orders_after(0)
            .await
            .expect("orders")
            .len()
            == 1
    })
    .await;
    assert_eq!(p.runtime.status().await.queues["orders"].dead, 2);
    let orders = p.ws.store().await.orders_after(0).await.expect("orders");
    assert_eq!(orders[0].lines[0].quantity, 2, "only b was replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loggers_and_reload_show_the_change_and_its_result() {
    let logs = runtime_core::install_subscriber("info");
    let p = plane(logs).await;
    let mut admin = Client::new(&p.app);
    admin.login("admin-token-1-4b8e2d6f0a3c9e17b5d2").await;
    let csrf = admin.csrf().await;

    let page = admin.get("/ui/loggers").await;
    assert!(
        page.text.contains("id=\"log-filter\">info<"),
        "{}",
        page.text
    );
    let bad = admin
        .post(
            "/ui/loggers",
            &[("csrf", &csrf), ("filter", "info,[[["), ("confirm", "yes")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text);
    assert!(bad.text.contains("is not a valid filter"));
    let ask = admin
        .post(
            "/ui/loggers",
            &[("csrf", &csrf), ("filter", "info,mail_order_bot=debug")],
        )
        .await;
    assert!(
        ask.text.contains("Change the log filter from"),
        "{}",
        ask.text
    );
    let done = admin
        .post(
            "/ui/loggers",
            &[
                ("csrf", &csrf),
                ("filter", "info,mail_order_bot=debug"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER);
    let page = admin.get("/ui/loggers").await;
    assert!(
        page.text
            .contains("id=\"log-filter\">info,mail_order_bot=debug<"),
        "{}",
        page.text
    );

    // A good edit: applied live, with its diff.
    std::fs::write(&p.config_path, p.ws.config_text(5, 2, CONTROL)).expect("edit");
    let ask = admin.post("/ui/config/reload", &[("csrf", &csrf)]).await;
    assert!(
        ask.text.contains("Read the configuration again"),
        "{}",
        ask.text
    );
    let applied = admin
        .post("/ui/config/reload", &[("csrf", &csrf), ("confirm", "yes")])
        .await;
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.text);
    assert!(applied.text.contains("Applied live."), "{}", applied.text);
    assert!(
        applied
            .text
            .contains("<code>pools.orders.workers</code></td><td>2</td><td>5</td>"),
        "{}",
        applied.text
    );
    assert_eq!(p.runtime.status().await.pools[0].workers, 5);
    // A bad one: rejected with every problem, nothing changed.
    std::fs::write(
        &p.config_path,
        p.ws.config_text(0, 2, CONTROL)
            .replace("max_attempts = 2", "max_attempts = 0"),
    )
    .expect("edit");
    let rejected = admin
        .post("/ui/config/reload", &[("csrf", &csrf), ("confirm", "yes")])
        .await;
    assert_eq!(
        rejected.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        rejected.text
    );
    assert!(
        rejected.text.contains("Rejected: the configuration has"),
        "{}",
        rejected.text
    );
    assert!(
        rejected.text.contains("pools.orders.workers"),
        "{}",
        rejected.text
    );
    assert!(!rejected.text.contains("id=\"diff\""), "nothing changed");
    assert_eq!(p.runtime.status().await.pools[0].workers, 5);
    let config = admin.get("/ui/config").await;
    assert!(config.text.contains("was refused"), "{}", config.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_previews_an_outcome_replay_and_runs_it_after_confirming() {
    let p = plane(None).await;
    p.ws.deliver("no-lines", &order_mail("no-lines", "x@acme.example", &[]));
    let processed = || {
        p.runtime
            .pool_status()
            .into_iter()
            .find(|s| s.name == "orders")
            .map_or(0, |s| s.processed)
    };
    wait_for(Duration::from_secs(30), "the outcome", || async {
        processed() == 1
    })
    .await;

    // A reader sees the action, not its form.
    let mut reader = Client::new(&p.app);
    reader.login("read-token-1-7c1f0e9b2d4a6f835e21").await;
    let page = reader.get("/ui/actions").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert!(page.text.contains("outcomes.replay"), "{}", page.text);
    assert!(!page.text.contains("action=\"/ui/actions/outcomes.replay\""));

    let mut admin = Client::new(&p.app);
    admin.login("admin-token-1-4b8e2d6f0a3c9e17b5d2").await;
    let page = admin.get("/ui/actions").await;
    assert!(
        page.text.contains("action=\"/ui/actions/outcomes.replay\""),
        "{}",
        page.text
    );
    let csrf = admin.csrf().await;
    let forged = admin
        .post(
            "/ui/actions/outcomes.replay",
            &[("csrf", "wrong"), ("kind", "no_lines")],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let bad = admin
        .post(
            "/ui/actions/outcomes.replay",
            &[("csrf", &csrf), ("kind", "created")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text);

    // The first submission is a dry run that asks.
    let preview = admin
        .post(
            "/ui/actions/outcomes.replay",
            &[
                ("csrf", &csrf),
                ("kind", "no_lines"),
                ("sender", ""),
                ("limit", "10"),
            ],
        )
        .await;
    assert_eq!(preview.status, StatusCode::OK, "{}", preview.text);
    assert!(
        preview
            .text
            .contains("would run 1 message recorded as no_lines"),
        "{}",
        preview.text
    );
    assert!(preview.text.contains("x@acme.example"), "{}", preview.text);
    assert!(preview.text.contains("name=\"confirm\" value=\"yes\""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(processed(), 1, "a preview runs nothing");

    let run = admin
        .post(
            "/ui/actions/outcomes.replay",
            &[
                ("csrf", &csrf),
                ("kind", "no_lines"),
                ("limit", "10"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(run.status, StatusCode::SEE_OTHER, "{}", run.text);
    assert_eq!(location(&run), "/ui/actions");
    let after = admin.get("/ui/actions").await;
    assert!(after.text.contains("running 1 message"), "{}", after.text);
    wait_for(Duration::from_secs(30), "the replayed message", || async {
        processed() == 2
    })
    .await;
    // Decided again the same: still one outcome, no order.
    let store = p.ws.store().await;
    let outcomes = store.outcomes().await.expect("outcomes");
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].outcome, "no_lines");
    assert!(store.orders_after(0).await.expect("orders").is_empty());
    p.runtime.shutdown().await;
}

/// A message whose attempt failed waits for its next one: the Retries page lists it with
/// the time the stepped schedule (`["1h"]`) gave it, and `/diagnostics` carries the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_retries_show_when_their_next_attempt_is_due() {
    let p = plane::plane_edited(None, CONTROL, |text| {
        let edited = text.replace("max_attempts = 2\n", "").replace(
            "[pools.orders.retry]\ninitial_backoff_ms = 10\nmax_backoff_ms = 50\njitter = 0.1",
            "[pools.orders.retry]\nschedule = [\"1h\"]",
        );
        assert!(
            edited.contains("schedule = "),
            "the retry table was replaced"
        );
        edited
    })
    .await;
    p.ws.store().await;
    let _db = refuse_sku_666(&p.ws).await;
    p.ws.deliver(
        "1.bad",
        &order_mail("bad", "purchasing@acme.example", &[("SKU-666", 3)]),
    );
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    wait_for(Duration::from_secs(60), "a scheduled retry", || async {
        p.runtime.status().await.queues["orders"].scheduled == 1
    })
    .await;
    let diagnostics = p.runtime.diagnostics().await;
    assert_eq!(diagnostics.retries.len(), 1, "{diagnostics:?}");
    let retry = &diagnostics.retries[0];
    assert_eq!(
        (retry.task.as_str(), retry.attempts),
        ("maildir:inbox:1.bad", 1)
    );
    let due = retry.next_attempt_at_unix_ms.expect("due");
    assert!(
        (before + 3_600_000..before + 3_660_000).contains(&due),
        "an hour after the failure: {due} vs {before}"
    );
    let mut reader = Client::new(&p.app);
    reader.login("read-token-1-7c1f0e9b2d4a6f835e21").await;
    let page = reader.get("/ui/retries").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.text
            .contains("1 task(s) waiting for their next attempt."),
        "{}",
        page.text
    );
    assert!(
        page.text.contains("maildir:inbox:1.bad") && page.text.contains("ERP rejected SKU-666"),
        "{}",
        page.text
    );
    let due_text = chrono::DateTime::from_timestamp_millis(due as i64)
        .expect("time")
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string();
    assert!(page.text.contains(&due_text), "{due_text}: {}", page.text);
    p.runtime.shutdown().await;
}
