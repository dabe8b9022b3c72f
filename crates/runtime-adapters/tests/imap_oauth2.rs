//! Token logins (XOAUTH2, OAUTHBEARER) of the IMAP source against a private Dovecot whose
//! `oauth2` passdb introspects every token at testkit's token endpoint.

use std::time::Duration;

use plba_testkit::{DovecotOptions, DovecotServer, TokenMode, TokenServer};
use runtime_adapters::sources::imap::{ImapConfig, ImapMode, ImapSource};
use runtime_contracts::TaskSource;

const USER: &str = "orders";
const CLIENT_SECRET: &str = "client-secret-0123456789abcdef";
const REFRESH: &str = "refresh-token-initial-0123456789";

fn servers(lifetime: Duration) -> (TokenServer, DovecotServer) {
    let tokens = TokenServer::start(USER, lifetime);
    tokens.add_client("plba-app", CLIENT_SECRET);
    tokens.add_refresh_token(REFRESH);
    let dovecot = DovecotServer::start_with(
        &[(USER, "unused-password-for-setup")],
        DovecotOptions {
            oauth2_introspection_url: Some(tokens.introspection_url()),
            ..DovecotOptions::default()
        },
    );
    (tokens, dovecot)
}

/// The source's settings: `auth`, and the `[oauth2]` table for `grant`.
fn config(
    dovecot: &DovecotServer,
    tokens: &TokenServer,
    dir: &std::path::Path,
    auth: &str,
    grant: &str,
) -> ImapConfig {
    let secret = dir.join("client-secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).expect("secret");
    let refresh = dir.join("refresh-token");
    if !refresh.exists() {
        std::fs::write(&refresh, format!("{REFRESH}\n")).expect("refresh");
    }
    let mut oauth2 = serde_json::json!({
        "token_url": tokens.token_url(), "client_id": "plba-app",
        "client_secret_file": secret, "grant": grant, "timeout_ms": 2000,
    });
    if grant == "refresh_token" {
        oauth2["refresh_token_file"] = serde_json::json!(refresh);
    }
    let config: ImapConfig = serde_json::from_value(serde_json::json!({
        "host": "127.0.0.1", "port": dovecot.port(), "tls": "none", "user": USER,
        "auth": auth, "oauth2": oauth2, "pool": "orders", "connections": 2,
    }))
    .expect("config");
    let problems = config.problems("sources.inbox");
    assert!(problems.is_empty(), "{problems:?}");
    config
}

fn message(n: usize) -> Vec<u8> {
    format!("Subject: {n}\r\nMessage-ID: <o{n}@example>\r\n\r\nSKU-{n} x 1\r\n").into_bytes()
}

#[tokio::test]
async fn token_logins_by_xoauth2_and_oauthbearer_for_both_grants() {
    let (tokens, dovecot) = servers(Duration::from_secs(300));
    for (n, (auth, grant)) in [
        ("xoauth2", "client_credentials"),
        ("oauthbearer", "client_credentials"),
        ("xoauth2", "refresh_token"),
        ("oauthbearer", "refresh_token"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let imap = ImapSource::new(
            "inbox",
            config(&dovecot, &tokens, dir.path(), auth, grant),
            ImapMode::Poll,
        );
        imap.reachable()
            .await
            .unwrap_or_else(|e| panic!("{auth} with {grant}: {e}\n{}", dovecot.log()));
        // Several logins share the cached token.
        let first = imap
            .unsettled(Duration::from_secs(0), 10)
            .await
            .expect("search");
        assert!(first.is_empty(), "{auth}/{grant}: nothing is there yet");
        assert_eq!(
            imap.token_stats().expect("token stats").requests,
            1,
            "{auth}/{grant}: one token for every login"
        );
        let counts = tokens.counts();
        assert_eq!(counts.issued_total(), n as u64 + 1, "{counts:?}");
    }
    let counts = tokens.counts();
    assert_eq!(counts.issued.get("client_credentials"), Some(&2));
    assert_eq!(counts.issued.get("refresh_token"), Some(&2));
    assert!(
        counts.active >= 4,
        "Dovecot introspected each login: {counts:?}"
    );
}

/// A refused token (revoked at the endpoint) is replaced once and the login succeeds.
#[tokio::test]
async fn a_revoked_token_is_replaced_at_the_next_login() {
    let (tokens, dovecot) = servers(Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let imap = ImapSource::new(
        "inbox",
        config(
            &dovecot,
            &tokens,
            dir.path(),
            "xoauth2",
            "client_credentials",
        ),
        ImapMode::Poll,
    );
    dovecot.append(USER, "unused-password-for-setup", "INBOX", &[message(1)]);
    // `unsettled` lists mail at least a second old.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        imap.unsettled(Duration::from_secs(0), 10)
            .await
            .expect("search")
            .len(),
        1
    );
    tokens.revoke_all();
    // The server restarts, so the pooled session is gone: the next login is refused with the
    // revoked token, and succeeds with a new one.
    let mut dovecot = dovecot;
    dovecot.restart();
    // The pooled session died with the server: the first search finds that out.
    let _ = imap.unsettled(Duration::from_secs(0), 10).await;
    let found = imap
        .unsettled(Duration::from_secs(0), 10)
        .await
        .expect("after a refresh");
    assert_eq!(found.len(), 1, "no mail is lost");
    let stats = imap.token_stats().expect("stats");
    assert_eq!(
        stats.requests, 2,
        "one refresh after the refusal: {stats:?}"
    );
}

/// A rotated refresh token is written back to the file it came from, and works next time.
#[tokio::test]
async fn a_rotated_refresh_token_is_kept_in_its_file() {
    let (tokens, dovecot) = servers(Duration::from_secs(300));
    tokens.rotate_refresh_tokens(true);
    let dir = tempfile::tempdir().expect("tempdir");
    let imap = ImapSource::new(
        "inbox",
        config(
            &dovecot,
            &tokens,
            dir.path(),
            "oauthbearer",
            "refresh_token",
        ),
        ImapMode::Poll,
    );
    imap.reachable().await.expect("login");
    let kept = std::fs::read_to_string(dir.path().join("refresh-token")).expect("file");
    assert_ne!(kept.trim(), REFRESH, "the file holds the rotated token");
    assert!(tokens.secrets().iter().any(|s| s == kept.trim()));
    drop(imap);
    // A restarted source reads the rotated token (the old one no longer works).
    let again = ImapSource::new(
        "inbox",
        config(
            &dovecot,
            &tokens,
            dir.path(),
            "oauthbearer",
            "refresh_token",
        ),
        ImapMode::Poll,
    );
    again
        .reachable()
        .await
        .expect("login with the rotated token");
    assert_eq!(again.token_stats().expect("stats").rotations, 1);
}

/// Endpoint failures are errors that name the endpoint's words, never a secret.
#[tokio::test]
async fn endpoint_failures_say_what_the_endpoint_said() {
    let (tokens, dovecot) = servers(Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let source = || {
        ImapSource::new(
            "inbox",
            config(
                &dovecot,
                &tokens,
                dir.path(),
                "xoauth2",
                "client_credentials",
            ),
            ImapMode::Poll,
        )
    };
    tokens.set_mode(TokenMode::InvalidClient);
    let e = source().reachable().await.expect_err("invalid_client");
    assert!(
        e.contains("invalid_client") && e.contains("AADSTS7000215"),
        "{e}"
    );
    tokens.set_mode(TokenMode::ServerError);
    let e = source().reachable().await.expect_err("500");
    assert!(e.contains("HTTP 500"), "{e}");
    tokens.set_mode(TokenMode::Hang);
    let started = std::time::Instant::now();
    let e = source().reachable().await.expect_err("no answer");
    assert!(e.contains("no answer") || e.contains("within"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    for secret in tokens.secrets() {
        assert!(!e.contains(&secret));
    }
    tokens.set_mode(TokenMode::Normal);
    source().reachable().await.expect("recovers");
}
