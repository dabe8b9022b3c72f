//! The bot process on a mailbox that takes OAuth2 logins only: a private Dovecot whose
//! `oauth2` passdb introspects every token at testkit's token endpoint, which issues
//! tokens of a few seconds. Token expiries under IDLE and a busy worker pool, a client
//! secret the endpoint refuses (then fixed by a reload), and the endpoint down for 30 s.
//! Every line the bot logged and every control-plane answer is searched for the tokens,
//! the client secret and the refresh token: none may appear.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{assert_store_exactly_once, mixed_mail, wait_for, Workspace};
use plba_testkit::{DovecotOptions, DovecotServer, TokenServer};

const USER: &str = "orders";
const CLIENT_SECRET: &str = "client-secret-0123456789abcdef";

/// The token endpoint and a Dovecot that takes its tokens.
fn servers(lifetime: Duration) -> (TokenServer, DovecotServer) {
    let tokens = TokenServer::start(USER, lifetime);
    tokens.add_client("plba-app", CLIENT_SECRET);
    let dovecot = DovecotServer::start_with(
        &[(USER, "setup-only-password")],
        DovecotOptions {
            oauth2_introspection_url: Some(tokens.introspection_url()),
            ..DovecotOptions::default()
        },
    );
    (tokens, dovecot)
}

/// Writes `secret` to a file named `name` in the workspace and returns its path.
fn secret_file(ws: &Workspace, name: &str, secret: &str) -> std::path::PathBuf {
    let path = ws.dir.path().join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("secret file");
    path
}

/// The bot's config: an IMAP source of `kind` logging in by XOAUTH2 with the client
/// secret in `secret`, debug logs, and the control plane on a free loopback port.
fn bot_config(
    ws: &Workspace,
    dovecot: &DovecotServer,
    tokens: &TokenServer,
    kind: &str,
    secret: &std::path::Path,
) -> std::path::PathBuf {
    let text = ws
        .config_text(
            4,
            3,
            "\n[control]\nenabled = true\nbind = \"127.0.0.1:0\"\n",
        )
        .replacen("log = \"info\"", "log = \"debug\"", 1);
    let start = text.find("[sources.inbox]").expect("source section");
    let end = text.find("[apps.mail_order_bot]").expect("app section");
    let section = format!(
        "[sources.inbox]\ntype = \"{kind}\"\npool = \"orders\"\nuser = \"{USER}\"\nhost = \"127.0.0.1\"\n\
         port = {}\ntls = \"none\"\nauth = \"xoauth2\"\npoll_interval_ms = 200\nmax_backoff_ms = 1000\n\
         idle_check_secs = 5\n\n[sources.inbox.oauth2]\ntoken_url = \"{}\"\nclient_id = \"plba-app\"\n\
         client_secret_file = \"{}\"\ngrant = \"client_credentials\"\nscope = \"imap\"\ntimeout_ms = 2000\n\n",
        dovecot.port(),
        tokens.token_url(),
        secret.display()
    );
    let path = ws.dir.path().join("bot-oauth2.toml");
    std::fs::write(
        &path,
        format!("{}{section}{}", &text[..start], &text[end..]),
    )
    .expect("config");
    path
}

/// The bot process, every line it logs, and its control plane's address.
struct Bot {
    child: std::process::Child,
    logs: Arc<Mutex<Vec<String>>>,
    addr: String,
    /// Every control-plane answer so far.
    answers: Vec<String>,
}

impl Bot {
    fn spawn(config: &std::path::Path) -> Self {
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (child, addr) =
            common::plane::spawn_with_control_logs(config, &[], Some(Arc::clone(&logs)));
        Self {
            child,
            logs,
            addr,
            answers: Vec::new(),
        }
    }

    async fn get(&mut self, path: &str) -> (u16, String) {
        let reply = reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = reply.status().as_u16();
        let body = reply.text().await.expect("body");
        self.answers.push(format!("GET {path} -> {status}\n{body}"));
        (status, body)
    }

    async fn post(&mut self, path: &str) -> (u16, String) {
        let reply = reqwest::Client::new()
            .post(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = reply.status().as_u16();
        let body = reply.text().await.expect("body");
        self.answers
            .push(format!("POST {path} -> {status}\n{body}"));
        (status, body)
    }

    async fn ready(&mut self) -> bool {
        self.get("/health/ready").await.0 == 200
    }

    async fn source_status(&mut self) -> serde_json::Value {
        let (_, body) = self.get("/status").await;
        let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        status["sources"]["inbox"].clone()
    }

    /// Asks every read endpoint once, so that each answer is searched for secrets.
    async fn ask_everything(&mut self) {
        for path in [
            "/status",
            "/config",
            "/health/ready",
            "/health/live",
            "/diagnostics",
            "/metrics",
            "/queues/orders/dead-letters",
        ] {
            self.get(path).await;
        }
    }

    /// Stops the bot (SIGTERM) and asserts that no log line and no answer holds a secret.
    fn stop_and_check(mut self, secrets: &[String], label: &str) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = self.child.wait().expect("the bot stops");
        assert!(status.success(), "{label}: {status:?}");
        // The reader thread has the last lines once the pipe closes.
        std::thread::sleep(Duration::from_millis(200));
        let logs = self.logs.lock().expect("logs");
        assert!(logs.len() > 20, "{label}: the bot logged: {logs:?}");
        assert!(!secrets.is_empty());
        for secret in secrets {
            for line in logs.iter() {
                assert!(
                    !line.contains(secret.as_str()),
                    "{label}: a log line holds a secret: {line}"
                );
            }
            for answer in &self.answers {
                assert!(
                    !answer.contains(secret.as_str()),
                    "{label}: a control-plane answer holds a secret: {answer}"
                );
            }
        }
    }
}

/// The messages in the INBOX with `\Seen`, and without.
fn seen_split(dovecot: &DovecotServer) -> (usize, usize) {
    let flags = dovecot.flags(USER, "setup-only-password", "INBOX");
    let seen = flags
        .values()
        .filter(|f| f.iter().any(|x| x == "\\Seen"))
        .count();
    (seen, flags.len() - seen)
}

fn append(dovecot: &DovecotServer, mails: &[String]) {
    let bytes: Vec<Vec<u8>> = mails.iter().map(|m| m.clone().into_bytes()).collect();
    dovecot.append(USER, "setup-only-password", "INBOX", &bytes);
}

/// Tokens of five seconds, renewed a fifth ahead: IDLE and four worker sessions keep the
/// mail flowing across at least three expiries, and the source asks for one token per
/// expiry, not one per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_the_pool_keep_mail_flowing_across_token_expiries_with_one_request_each() {
    let lifetime = Duration::from_secs(5);
    let (tokens, dovecot) = servers(lifetime);
    let ws = Workspace::new();
    let secret = secret_file(&ws, "client-secret", CLIENT_SECRET);
    let mut bot = Bot::spawn(&bot_config(&ws, &dovecot, &tokens, "imap_idle", &secret));
    let began = Instant::now();
    let (mails, expected) = mixed_mail(200);
    // Mail arrives in waves for 17 s: more than three lifetimes.
    let waves = mails.chunks(20).count();
    for (n, wave) in mails.chunks(20).enumerate() {
        append(&dovecot, wave);
        let arrived: usize = mails.chunks(20).take(n + 1).map(<[String]>::len).sum();
        wait_for(
            Duration::from_secs(30),
            &format!("wave {n} of {waves} seen"),
            || async { seen_split(&dovecot).0 == arrived },
        )
        .await;
        let due = began + Duration::from_millis(1_700 * (n as u64 + 1));
        tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
    }
    let ran = began.elapsed();
    assert!(ran > lifetime * 3, "ran for {ran:?}");
    assert!(bot.ready().await, "ready after the expiries");
    bot.ask_everything().await;
    let counts = tokens.counts();
    // Renewed every 4 s (a fifth ahead of the 5 s expiry), plus the first token and one
    // for a renewal racing the end: five connections asking each would be five times that.
    let renewals = (ran.as_secs_f64() / 4.0).ceil() as u64;
    println!(
        "oauth2 expiries: {} tokens issued in {:.1} s ({} token requests, {} introspections) for five connections",
        counts.issued_total(),
        ran.as_secs_f64(),
        counts.token_requests,
        counts.introspections
    );
    assert!(
        counts.issued_total() >= 3 && counts.issued_total() <= renewals + 2,
        "{} tokens in {ran:?} for five connections: {counts:?}",
        counts.issued_total()
    );
    bot.stop_and_check(&tokens.secrets(), "expiries");
    assert_store_exactly_once(&ws, &expected).await;
    assert_eq!(seen_split(&dovecot), (200, 0));
}

/// A client secret the endpoint refuses (`invalid_client`): readiness turns within 5 s and
/// `/status` says what the endpoint said; mail waits unread. A reload that names the right
/// secret restarts the source, without restarting the process, and the mail flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_turns_readiness_and_a_reload_with_the_right_secret_recovers() {
    let (tokens, dovecot) = servers(Duration::from_secs(60));
    let ws = Workspace::new();
    let wrong = secret_file(&ws, "old-secret", "a-secret-the-endpoint-refuses-42");
    let config = bot_config(&ws, &dovecot, &tokens, "imap_poll", &wrong);
    let (mails, expected) = mixed_mail(40);
    append(&dovecot, &mails);
    let started = Instant::now();
    let mut bot = Bot::spawn(&config);
    let mut turned = None;
    while started.elapsed() < Duration::from_secs(10) {
        if !bot.ready().await {
            turned = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let turned = turned.expect("readiness turns down");
    assert!(turned < Duration::from_secs(5), "took {turned:?}");
    let mut status = bot.source_status().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !status["last_error"]
        .as_str()
        .unwrap_or("")
        .contains("invalid_client")
    {
        assert!(Instant::now() < deadline, "no reason in /status: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = bot.source_status().await;
    }
    assert_eq!(status["state"], "degraded", "{status}");
    assert_eq!(
        seen_split(&dovecot),
        (0, 40),
        "no mail read without a login"
    );

    // The operator names the right secret's file and reloads.
    let right = secret_file(&ws, "new-secret", CLIENT_SECRET);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace(&wrong.display().to_string(), &right.display().to_string()),
    )
    .expect("config");
    let (code, body) = bot.post("/config/reload").await;
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("report");
    assert_eq!(
        report["restarted"],
        serde_json::json!(["inbox"]),
        "{report}"
    );
    assert_eq!(
        report["applied"],
        serde_json::json!(["sources.inbox.oauth2.client_secret_file"]),
        "{report}"
    );
    wait_for(Duration::from_secs(30), "the mail read", || async {
        seen_split(&dovecot) == (40, 0)
    })
    .await;
    let ready_by = Instant::now() + Duration::from_secs(10);
    while !bot.ready().await {
        assert!(Instant::now() < ready_by, "ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bot.source_status().await["restarts"].as_u64() >= Some(1));
    bot.ask_everything().await;
    let mut secrets = tokens.secrets();
    secrets.push("a-secret-the-endpoint-refuses-42".to_owned());
    bot.stop_and_check(&secrets, "invalid_client");
    assert_store_exactly_once(&ws, &expected).await;
}

/// The token endpoint down for 30 s while tokens of three seconds expire: the source turns
/// degraded (sessions cannot log in again), recovers by itself once the endpoint is back,
/// and every mail is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_down_for_30_s_recovers_by_itself() {
    let (mut tokens, dovecot) = servers(Duration::from_secs(3));
    let ws = Workspace::new();
    let secret = secret_file(&ws, "client-secret", CLIENT_SECRET);
    let mut bot = Bot::spawn(&bot_config(&ws, &dovecot, &tokens, "imap_poll", &secret));
    let (mails, expected) = mixed_mail(90);
    append(&dovecot, &mails[..30]);
    wait_for(Duration::from_secs(30), "the first mail read", || async {
        seen_split(&dovecot).0 == 30
    })
    .await;
    tokens.down();
    let down_at = Instant::now();
    append(&dovecot, &mails[30..60]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while bot.ready().await {
        assert!(
            Instant::now() < deadline,
            "readiness turns while no token can be had"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = bot.source_status().await;
    assert_eq!(status["state"], "degraded", "{status}");
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down_at.elapsed())).await;
    append(&dovecot, &mails[60..]);
    tokens.up();
    wait_for(
        Duration::from_secs(60),
        "every mail read after the outage",
        || async { seen_split(&dovecot) == (90, 0) },
    )
    .await;
    let ready_by = Instant::now() + Duration::from_secs(10);
    while !bot.ready().await {
        assert!(Instant::now() < ready_by, "ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bot.ask_everything().await;
    bot.stop_and_check(&tokens.secrets(), "endpoint down");
    assert_store_exactly_once(&ws, &expected).await;
}

/// Every token revoked at the endpoint, then Dovecot restarted, so that every session logs
/// in again with the cached (now refused) token: the source asks for one new token, the
/// logins succeed, and no mail is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_replaced_at_the_next_login_and_no_mail_is_lost() {
    let (tokens, mut dovecot) = servers(Duration::from_secs(3600));
    let ws = Workspace::new();
    let secret = secret_file(&ws, "client-secret", CLIENT_SECRET);
    let mut bot = Bot::spawn(&bot_config(&ws, &dovecot, &tokens, "imap_idle", &secret));
    let (mails, expected) = mixed_mail(60);
    append(&dovecot, &mails[..30]);
    wait_for(Duration::from_secs(30), "the first mail read", || async {
        seen_split(&dovecot).0 == 30
    })
    .await;
    assert_eq!(
        tokens.counts().issued_total(),
        1,
        "one token for every login"
    );
    tokens.revoke_all();
    dovecot.restart();
    append(&dovecot, &mails[30..]);
    wait_for(
        Duration::from_secs(60),
        "the rest read after the restart",
        || async { seen_split(&dovecot) == (60, 0) },
    )
    .await;
    assert_eq!(
        tokens.counts().issued_total(),
        2,
        "one new token once the cached one was refused"
    );
    bot.ask_everything().await;
    bot.stop_and_check(&tokens.secrets(), "revoked");
    assert_store_exactly_once(&ws, &expected).await;
}
