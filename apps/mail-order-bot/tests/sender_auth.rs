//! Sender authentication through the bot process: only mail whose `From` the receiving MTA
//! vouches for (the topmost `Authentication-Results` of the configured authserv-id: DMARC
//! pass, or an aligned DKIM or SPF pass) makes an order; the rest is recorded as
//! `unauthenticated_sender`, marked seen, never an order, never answered.

mod common;

use common::{order_mail, unseen, BotProcess, Workspace};
use mail_order_bot::module::BotConfig;

const TRUSTED: &str = "mx.plba.test";

fn with_results(id: &str, from: &str, results: &[&str]) -> String {
    let headers: String = results
        .iter()
        .map(|r| format!("Authentication-Results: {r}\r\n"))
        .collect();
    format!("{headers}{}", order_mail(id, from, &[("SKU-1", 1)]))
}

#[test]
fn only_mail_the_receiving_mta_vouches_for_makes_orders() {
    let ws = Workspace::new();
    let t = TRUSTED;
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "dmarc-pass",
            with_results("dmarc-pass", "buyer@acme.example", &[&format!("{t}; dkim=pass header.d=acme.example; dmarc=pass (p=reject) header.from=acme.example")]),
            "created",
            "",
        ),
        (
            "dkim-aligned",
            with_results("dkim-aligned", "buyer@acme.example", &[&format!("{t};\r\n\tdkim=pass (2048-bit key) header.d=mail.acme.example header.s=s1;\r\n\tspf=none")]),
            "created",
            "",
        ),
        (
            "forged-no-header",
            order_mail("forged-no-header", "buyer@acme.example", &[("SKU-1", 1)]),
            "unauthenticated_sender",
            "no Authentication-Results header from mx.plba.test",
        ),
        (
            "broken-signature",
            with_results("broken-signature", "buyer@acme.example", &[&format!("{t}; dkim=fail (body hash did not verify) header.d=acme.example; dmarc=fail header.from=acme.example")]),
            "unauthenticated_sender",
            "dmarc=fail",
        ),
        (
            "p-reject-domain",
            with_results("p-reject-domain", "buyer@nordic.example", &[&format!("{t}; spf=softfail smtp.mailfrom=x@bulk.example; dmarc=fail (p=reject dis=reject) header.from=nordic.example")]),
            "unauthenticated_sender",
            "dmarc=fail for nordic.example",
        ),
        (
            "unaligned-d",
            with_results("unaligned-d", "buyer@acme.example", &[&format!("{t}; dkim=pass header.d=attacker.example; spf=pass smtp.mailfrom=bounce@attacker.example")]),
            "unauthenticated_sender",
            "dkim=pass (attacker.example)",
        ),
        (
            "planted-below",
            with_results("planted-below", "buyer@acme.example", &[&format!("{t}; dmarc=fail header.from=acme.example"), &format!("{t}; dmarc=pass header.from=acme.example")]),
            "unauthenticated_sender",
            "dmarc=fail",
        ),
        (
            "planted-above",
            with_results("planted-above", "buyer@acme.example", &["evil.example; dmarc=pass header.from=acme.example", &format!("{t}; dmarc=fail header.from=acme.example")]),
            "unauthenticated_sender",
            "dmarc=fail",
        ),
        (
            "legacy-client",
            order_mail("legacy-client", "orders@oldco.example", &[("SKU-1", 1)]),
            "created",
            "",
        ),
    ];
    for (name, mail, _, _) in &cases {
        ws.deliver(name, mail);
    }
    let config = ws.dir.path().join("auth.toml");
    let text = ws
        .config_text(2, 3, "\n[[apps.mail_order_bot.clients]]\nid = \"C-9\"\nname = \"Old Co\"\ndomains = [\"oldco.example\"]\nallow_unauthenticated = true\n")
        .replacen(
            "sender_auth = { mode = \"off\" }",
            &format!("sender_auth = {{ mode = \"authentication-results\", authserv_id = \"{TRUSTED}\" }}"),
            1,
        );
    assert!(text.contains("authentication-results"), "{text}");
    std::fs::write(&config, text).expect("config");
    let (code, stdout, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(unseen(&ws), 0, "every message has its outcome and is seen");
    assert!(stdout.contains("created 3 new orders"), "{stdout}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let outcomes = rt.block_on(async { ws.store().await.outcomes().await.expect("outcomes") });
    for (name, _, outcome, reason) in &cases {
        let identity = format!("mid:{name}@test.example");
        let got = outcomes
            .iter()
            .find(|o| o.message_identity == identity)
            .unwrap_or_else(|| panic!("{name}: no outcome in {outcomes:#?}"));
        assert_eq!(&got.outcome, outcome, "{name}: {got:?}");
        assert!(
            got.reason.as_deref().unwrap_or("").contains(reason),
            "{name}: {got:?}"
        );
        assert_eq!(
            got.order_id.is_some(),
            *outcome == "created",
            "{name}: {got:?}"
        );
    }
}

#[test]
fn a_configuration_must_choose_how_senders_are_authenticated() {
    let problems = |section: serde_json::Value| {
        BotConfig::check(Some(&section))
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect::<Vec<_>>()
    };
    let missing = problems(serde_json::json!({ "store_url": "sqlite://x.db" }));
    assert!(
        missing
            .iter()
            .any(|p| p.starts_with("apps.mail_order_bot.sender_auth.mode: choose")),
        "{missing:?}"
    );
    let no_id = problems(serde_json::json!({
        "store_url": "sqlite://x.db",
        "sender_auth": { "mode": "authentication-results" }
    }));
    assert!(
        no_id
            .iter()
            .any(|p| p.starts_with("apps.mail_order_bot.sender_auth.authserv_id")),
        "{no_id:?}"
    );
    let unknown = problems(serde_json::json!({
        "store_url": "sqlite://x.db",
        "sender_auth": { "mode": "trust-me" }
    }));
    assert!(!unknown.is_empty());
    for ok in [
        serde_json::json!({ "store_url": "sqlite://x.db", "sender_auth": { "mode": "off" } }),
        serde_json::json!({ "store_url": "sqlite://x.db", "sender_auth": { "mode": "authentication-results", "authserv_id": "mx.google.com" } }),
    ] {
        assert_eq!(problems(ok.clone()), Vec::<String>::new(), "{ok}");
    }
}
