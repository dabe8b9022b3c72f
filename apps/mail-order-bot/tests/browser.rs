//! The operator console in a real browser: Debian's Chromium, driven over WebDriver by
//! chromedriver, against the real bot binary serving `/ui`.
//!
//! The story an operator lives: log in with the keyboard, see the overview, watch a failing
//! message turn into a dead letter on the live overview (no reload), fix the fault, replay
//! it from its page, and find its order in the bot's own pages. A read token sees no replay
//! button and its POST is refused. The page fits a phone's width. Screenshots go to the
//! test's output directory (`target/tmp/console/`).
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (packages `chromium` and
//! `chromium-driver`, installed by `scripts/test.sh`); without them it fails, never skips.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::plane::refuse_sku_666;
use common::{order_mail, Workspace};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A child process killed when dropped, so that a failed assertion leaves none behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// chromedriver on a free port, ready to take sessions.
fn chromedriver() -> (Killed, u16) {
    for path in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: install Debian's chromium and chromium-driver (scripts/test.sh does)"
        );
    }
    for _ in 0..5 {
        let port = free_port();
        let mut child = Killed(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.0.try_wait() {
                break; // its port was taken meanwhile: try another
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("chromedriver did not start");
}

async fn browser(port: u16, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a browser session")
}

/// The bot binary with its control plane and console on a free port; returns its address.
fn start_bot(ws: &Workspace) -> (Killed, String) {
    let control = r#"
[control]
enabled = true
bind = "127.0.0.1:0"
read_tokens = ["console-read-token-9a4e7c2b1f6d83"]
admin_tokens = ["console-admin-token-5e2b9d7a1c4f36"]
"#;
    let config = ws.config_with(2, 2, control);
    let (bot, addr) = common::plane::spawn_with_control(&config, &[]);
    (Killed(bot), addr)
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = shots().join(format!("{name}.png"));
    std::fs::write(&path, png).expect("write screenshot");
    eprintln!("screenshot: {}", path.display());
}

async fn click(c: &Client, locator: Locator<'_>, what: &str) {
    c.find(locator)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {what}: {e}"));
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("text")
}

/// Waits until `css` exists and its text contains `what`, reloading only when `reload`.
async fn wait_text(c: &Client, css: &str, what: &str, reload: bool, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if e.text().await.is_ok_and(|t| t.contains(what)) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{css} never showed {what:?}; the page:\n{}",
            c.source().await.unwrap_or_default()
        );
        if reload {
            c.refresh().await.expect("refresh");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// [`wait_text`] on the page as it is (no reload), for up to 10 s.
async fn see(c: &Client, css: &str, what: &str) {
    wait_text(c, css, what, false, Duration::from_secs(10)).await;
}

async fn log_in(c: &Client, addr: &str, token: &str) {
    c.goto(&format!("http://{addr}/ui")).await.expect("goto");
    assert!(
        c.current_url()
            .await
            .expect("url")
            .as_str()
            .ends_with("/ui/login"),
        "the console sends a stranger to its login form"
    );
    // With the keyboard only: the token field has the focus; Enter submits.
    let field = c.active_element().await.expect("the focused field");
    assert_eq!(
        field.attr("id").await.expect("id").as_deref(),
        Some("token")
    );
    field.send_keys(&format!("{token}\n")).await.expect("type");
    wait_text(c, "h1", "Overview", false, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replays_a_dead_letter_from_the_console_and_sees_its_order() {
    let ws = Workspace::new();
    ws.store().await;
    let db = refuse_sku_666(&ws).await;
    let (_driver, driver_port) = chromedriver();
    let (_bot, addr) = start_bot(&ws);
    let profile = tempfile::tempdir().expect("profile");
    let c = browser(driver_port, profile.path()).await;

    // Log in and see the overview.
    c.goto(&format!("http://{addr}/ui/login"))
        .await
        .expect("goto");
    shot(&c, "login").await;
    log_in(&c, &addr, "console-admin-token-5e2b9d7a1c4f36").await;
    assert!(text_of(&c, "#sources").await.contains("inbox"));
    assert!(text_of(&c, "#role").await.contains("admin"));
    assert_eq!(text_of(&c, "#readiness").await, "ready");

    // Mail arrives; the failing one turns into a dead letter on the live overview.
    ws.deliver(
        "1.good",
        &order_mail("good", "purchasing@acme.example", &[("SKU-1", 1)]),
    );
    ws.deliver(
        "2.bad",
        &order_mail("bad", "purchasing@acme.example", &[("SKU-666", 3)]),
    );
    ws.deliver(
        "3.worse",
        &order_mail("worse", "purchasing@acme.example", &[("SKU-666", 5)]),
    );
    wait_text(
        &c,
        "#queues a[href^='/ui/dead-letters']",
        "2",
        false,
        Duration::from_secs(60),
    )
    .await;
    let refreshed: Value = c
        .execute(
            "return document.getElementById('live').dataset.refreshed || null",
            vec![],
        )
        .await
        .expect("script");
    assert!(
        refreshed.is_string(),
        "the dead letters appeared by the page's own refresh, not a reload"
    );
    shot(&c, "overview").await;

    click(
        &c,
        Locator::Css("#queues a[href^='/ui/dead-letters']"),
        "the dead-letter count links to them",
    )
    .await;
    see(&c, "#dead-count", "2 matching").await;
    click(&c, Locator::LinkText("maildir:inbox:2.bad"), "its row").await;
    see(&c, "#dead-letter", "ERP rejected SKU-666").await;
    assert_eq!(
        c.find_all(Locator::Css("#attempts tbody tr"))
            .await
            .expect("attempts")
            .len(),
        2,
        "both failed attempts are listed"
    );
    shot(&c, "dead-letter").await;

    // Fix the fault, then replay from the page, confirming.
    sqlx::query("DROP TRIGGER erp_down")
        .execute(&db)
        .await
        .expect("fix the fault");
    click(
        &c,
        Locator::XPath("//button[normalize-space()='Replay']"),
        "the replay button",
    )
    .await;
    see(&c, "main", "back on queue orders?").await;
    click(
        &c,
        Locator::XPath("//button[normalize-space()='Replay']"),
        "the confirmation",
    )
    .await;
    see(&c, ".notice", "was put back on queue orders").await;

    // Its order shows in the bot's own pages.
    click(
        &c,
        Locator::LinkText("Orders"),
        "the bot's orders page in the navigation",
    )
    .await;
    wait_text(&c, "table.app", "(2 shown)", true, Duration::from_secs(60)).await;
    let rows = text_of(&c, "table.app tbody").await;
    assert!(rows.contains("purchasing@acme.example"), "{rows}");
    shot(&c, "orders").await;
    c.find(Locator::XPath(
        "//table[contains(@class,'app')]//tr[td[6][normalize-space()='1']]//a",
    ))
    .await
    .expect("an order's link")
    .click()
    .await
    .expect("click");
    see(&c, "main", "Lines of order").await;
    let detail = text_of(&c, "main").await;
    assert!(
        detail.contains("SKU-666") || detail.contains("SKU-1"),
        "{detail}"
    );
    let by_outcome = format!("http://{addr}/ui/app/outcomes?item=mid%3Abad%40test.example");
    c.goto(&by_outcome).await.expect("goto");
    see(&c, "main", "SKU-666").await;
    shot(&c, "message").await;

    // A phone's width: nothing wider than the screen but the tables' own scrollers.
    c.set_window_size(390, 844).await.expect("resize");
    c.goto(&format!("http://{addr}/ui")).await.expect("goto");
    see(&c, "h1", "Overview").await;
    let overflow: Value = c
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
            vec![],
        )
        .await
        .expect("script");
    assert!(
        overflow.as_i64().unwrap_or(1) <= 0,
        "the page scrolls sideways at 390 px: {overflow}"
    );
    shot(&c, "phone").await;
    c.set_window_size(1280, 1000).await.expect("resize");

    // A read token: no replay button, and the POST is refused.
    click(
        &c,
        Locator::XPath("//button[normalize-space()='Log out']"),
        "log out",
    )
    .await;
    see(&c, "h1", "Log in").await;
    log_in(&c, &addr, "console-read-token-9a4e7c2b1f6d83").await;
    assert!(text_of(&c, "#role").await.contains("read"));
    assert!(
        c.find_all(Locator::XPath("//button[normalize-space()='Pause']"))
            .await
            .expect("buttons")
            .is_empty(),
        "a reader gets no pause button"
    );
    let page = format!("http://{addr}/ui/dead-letters/orders/maildir%3Ainbox%3A3.worse");
    c.goto(&page).await.expect("goto");
    see(&c, "#dead-letter", "ERP rejected SKU-666").await;
    assert!(
        c.find_all(Locator::XPath(
            "//button[normalize-space()='Replay' or normalize-space()='Delete']"
        ))
        .await
        .expect("buttons")
        .is_empty(),
        "a reader gets no replay or delete button"
    );
    let status: Value = c
        .execute(
            "const csrf = document.querySelector('input[name=csrf]').value;
             return fetch(location.pathname + '/replay', {method: 'POST',
                 headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                 body: 'csrf=' + encodeURIComponent(csrf) + '&confirm=yes'}).then(r => r.status);",
            vec![],
        )
        .await
        .expect("script");
    assert_eq!(status, json!(403), "the read session's POST is refused");
    c.refresh().await.expect("refresh");
    see(&c, "#dead-letter", "maildir:inbox:3.worse").await;
    shot(&c, "read-only").await;

    c.close().await.expect("close the browser");
    drop(db);
}
