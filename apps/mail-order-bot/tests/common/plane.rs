//! An in-process control plane over a running bot, and requests to it
//! (`tower::ServiceExt::oneshot`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use mail_order_bot::compose::{build_runtime, control_config, load_config};
use mail_order_bot::module::MailOrderModule;
use runtime_core::RuntimeManager;
use serde_json::Value;
use tower::ServiceExt;

use super::{wait_for, Workspace};

pub const CONTROL: &str = r#"
[control]
enabled = true
bind = "127.0.0.1:0"
read_tokens = ["read-token-1-7c1f0e9b2d4a6f835e21"]
admin_tokens = ["admin-token-1-4b8e2d6f0a3c9e17b5d2"]
max_body_bytes = 1024
"#;

pub const READ: Option<&str> = Some("read-token-1-7c1f0e9b2d4a6f835e21");
pub const ADMIN: Option<&str> = Some("admin-token-1-4b8e2d6f0a3c9e17b5d2");

pub struct Plane {
    pub app: Router,
    pub runtime: Arc<RuntimeManager>,
    pub ws: Workspace,
    pub config_path: std::path::PathBuf,
}

pub async fn plane(logs: Option<runtime_core::LogControl>) -> Plane {
    plane_with(logs, CONTROL).await
}

/// A running bot (Maildir, in-memory queue, SQLite) and its control plane's router, with
/// `control` as its `[control]` section.
pub async fn plane_with(logs: Option<runtime_core::LogControl>, control: &str) -> Plane {
    plane_edited(logs, control, |text| text).await
}

/// [`plane_with`], its configuration text first changed by `edit`.
pub async fn plane_edited(
    logs: Option<runtime_core::LogControl>,
    control: &str,
    edit: impl FnOnce(String) -> String,
) -> Plane {
    let ws = Workspace::new();
    let config_path = ws.config_with(2, 2, control);
    let text = edit(std::fs::read_to_string(&config_path).expect("config"));
    std::fs::write(&config_path, text).expect("config");
    let manager = Arc::new(load_config(Some(&config_path), Some(HashMap::new())).expect("config"));
    let cfg = control_config(manager.root().get("control")).expect("control config");
    let mut runtime = build_runtime(Arc::clone(&manager), Arc::new(MailOrderModule), logs)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    let runtime = Arc::new(runtime);
    let app = runtime_adapters::control::router(Arc::clone(&runtime), &cfg);
    let plane = Plane {
        app,
        runtime,
        ws,
        config_path,
    };
    wait_for(Duration::from_secs(30), "the first scan", || async {
        plane.runtime.status().await.sources["inbox"]
            .last_event_age_ms
            .is_some()
    })
    .await;
    plane
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some((content_type, bytes)) => {
            if !content_type.is_empty() {
                req = req.header("content-type", content_type);
            }
            Body::from(bytes)
        }
        None => Body::empty(),
    };
    exchange(app, req.body(body).expect("request")).await
}

/// Sends one request to the router in process and reads the whole answer.
pub async fn exchange(app: &Router, req: Request<Body>) -> Reply {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// The fault of the dead-letter tests: the order database refuses SKU-666, as a failing ERP
/// would. Returns a connection that can lift it (`DROP TRIGGER erp_down`).
pub async fn refuse_sku_666(ws: &Workspace) -> sqlx::SqlitePool {
    let db = sqlx::SqlitePool::connect(&ws.store_url())
        .await
        .expect("db");
    sqlx::query(
        "CREATE TRIGGER erp_down BEFORE INSERT ON order_lines WHEN NEW.sku = 'SKU-666'
         BEGIN SELECT RAISE(ABORT, 'ERP rejected SKU-666'); END",
    )
    .execute(&db)
    .await
    .expect("trigger");
    db
}

/// Three dead letters on `p`'s `orders` queue (mails `a.mail`, `b.mail`, `c.mail` of SKU-666
/// × 1, 2 and 3, which the database refused), then the fault lifted: a replay makes orders.
pub async fn three_fixed_dead_letters(p: &Plane) {
    p.ws.store().await;
    let db = refuse_sku_666(&p.ws).await;
    for (name, qty) in [("a", 1), ("b", 2), ("c", 3)] {
        p.ws.deliver(
            &format!("{name}.mail"),
            &super::order_mail(name, "purchasing@acme.example", &[("SKU-666", qty)]),
        );
    }
    wait_for(Duration::from_secs(60), "three dead letters", || async {
        p.runtime.status().await.queues["orders"].dead == 3
    })
    .await;
    sqlx::query("DROP TRIGGER erp_down")
        .execute(&db)
        .await
        .expect("fix");
}

/// The bot binary on `config`, whose control plane binds a free port (`127.0.0.1:0`), with
/// `env` added; returns the process and the address it printed.
pub fn spawn_with_control(
    config: &std::path::Path,
    env: &[(&str, &str)],
) -> (std::process::Child, String) {
    spawn_with_control_logs(config, env, None)
}

/// [`spawn_with_control`], every line the bot writes to stderr also kept in `logs`.
pub fn spawn_with_control_logs(
    config: &std::path::Path,
    env: &[(&str, &str)],
    logs: Option<Arc<std::sync::Mutex<Vec<String>>>>,
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut bot = std::process::Command::new(env!("CARGO_BIN_EXE_mail-order-bot"))
        .args(["run", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the bot");
    let stderr = bot.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let early = Arc::clone(&seen);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("control plane listening on http://") {
                let _ = tx.send(addr.to_owned());
            }
            let mut early = early.lock().unwrap_or_else(|e| e.into_inner());
            if early.len() < 200 {
                early.push(line.clone());
            }
            if let Some(logs) = &logs {
                logs.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "the control plane's address: {e}; the bot wrote:\n{}",
                seen.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
            )
        });
    (bot, addr)
}
