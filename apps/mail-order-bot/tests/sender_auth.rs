//! Sender authentication through the bot process: only mail whose `From` the receiving MTA
//! vouches for (the topmost `Authentication-Results` of the configured authserv-id: DMARC
//! pass, or an aligned DKIM or SPF pass) makes an order; the rest is recorded as
//! `unauthenticated_sender`, marked seen, never an order, never answered. With
//! `mode = "verify"` the bot checks DKIM and DMARC itself against a private dnsmasq.

mod common;

use common::{order_mail, unseen, BotProcess, Workspace};
use mail_order_bot::module::BotConfig;

const TRUSTED: &str = "mx.plba.test";

/// Each case (name, mail, outcome, part of its reason) was recorded so; only `created` has
/// an order.
fn assert_outcomes(ws: &Workspace, cases: &[(&str, String, &str, &str)]) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let outcomes = rt.block_on(async { ws.store().await.outcomes().await.expect("outcomes") });
    for (name, _, outcome, reason) in cases {
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
    assert_outcomes(&ws, &cases);
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
    for (resolver, mode) in [("not-an-ip", "verify"), ("10.0.0.1", "off")] {
        let bad = problems(serde_json::json!({
            "store_url": "sqlite://x.db",
            "sender_auth": { "mode": mode, "resolver": resolver }
        }));
        assert!(
            bad.iter()
                .any(|p| p.starts_with("apps.mail_order_bot.sender_auth.resolver")),
            "{resolver} with {mode}: {bad:?}"
        );
    }
    let unknown = problems(serde_json::json!({
        "store_url": "sqlite://x.db",
        "sender_auth": { "mode": "trust-me" }
    }));
    assert!(!unknown.is_empty());
    for ok in [
        serde_json::json!({ "store_url": "sqlite://x.db", "sender_auth": { "mode": "off" } }),
        serde_json::json!({ "store_url": "sqlite://x.db", "sender_auth": { "mode": "authentication-results", "authserv_id": "mx.google.com" } }),
        serde_json::json!({ "store_url": "sqlite://x.db", "sender_auth": { "mode": "verify" } }),
        serde_json::json!({ "store_url": "sqlite://x.db", "sender_auth": { "mode": "verify", "resolver": "127.0.0.1:5353" } }),
    ] {
        assert_eq!(problems(ok.clone()), Vec::<String>::new(), "{ok}");
    }
}

/// A DKIM signer for one domain and selector, its public key ready for DNS.
#[derive(Clone)]
struct Signer {
    domain: &'static str,
    selector: &'static str,
    key: Key,
    body_length: bool,
}

#[derive(Clone)]
enum Key {
    Ed25519(Vec<u8>),
    Rsa(String),
}

impl Signer {
    fn ed25519(domain: &'static str, selector: &'static str) -> Self {
        let pkcs8 = mail_auth::common::crypto::Ed25519Key::generate_pkcs8().expect("ed25519 key");
        Self {
            domain,
            selector,
            key: Key::Ed25519(pkcs8),
            body_length: false,
        }
    }

    /// A 2048-bit RSA key made by openssl (what Microsoft 365 and Gmail sign with).
    fn rsa(domain: &'static str, selector: &'static str, dir: &std::path::Path) -> Self {
        let path = dir.join(format!("{selector}.{domain}.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path)
            .output()
            .expect("openssl is installed (scripts/test.sh installs it)");
        assert!(made.status.success(), "{made:?}");
        Self {
            domain,
            selector,
            key: Key::Rsa(std::fs::read_to_string(&path).expect("key")),
            body_length: false,
        }
    }

    /// The TXT record of its key: (`selector._domainkey.domain`, `v=DKIM1; ...`).
    fn record(&self, dir: &std::path::Path) -> (String, String) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let (k, p) = match &self.key {
            Key::Ed25519(pkcs8) => {
                let key =
                    mail_auth::common::crypto::Ed25519Key::from_pkcs8_der(pkcs8).expect("key");
                ("ed25519", b64.encode(key.public_key()))
            }
            Key::Rsa(pem) => {
                let path = dir.join(format!("{}.{}.pem", self.selector, self.domain));
                std::fs::write(&path, pem).expect("pem");
                let out = std::process::Command::new("openssl")
                    .args(["pkey", "-pubout", "-outform", "DER", "-in"])
                    .arg(&path)
                    .output()
                    .expect("openssl");
                assert!(out.status.success(), "{out:?}");
                ("rsa", b64.encode(out.stdout))
            }
        };
        (
            format!("{}._domainkey.{}", self.selector, self.domain),
            format!("v=DKIM1; k={k}; p={p}"),
        )
    }

    /// `mail` with this signer's DKIM-Signature on top.
    fn sign(&self, mail: &str) -> String {
        use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
        use mail_auth::common::headers::HeaderWriter as _;
        use mail_auth::dkim::DkimSigner;
        let headers = ["From", "To", "Subject", "Message-ID", "Date"];
        let signature = match &self.key {
            Key::Ed25519(pkcs8) => {
                DkimSigner::from_key(Ed25519Key::from_pkcs8_der(pkcs8).expect("key"))
                    .domain(self.domain)
                    .selector(self.selector)
                    .headers(headers)
                    .body_length(self.body_length)
                    .sign(mail.as_bytes())
            }
            Key::Rsa(pem) => {
                use rustls_pki_types::pem::PemObject as _;
                let der =
                    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("pem");
                DkimSigner::from_key(RsaKey::<Sha256>::from_key_der(der).expect("key"))
                    .domain(self.domain)
                    .selector(self.selector)
                    .headers(headers)
                    .body_length(self.body_length)
                    .sign(mail.as_bytes())
            }
        }
        .expect("signed");
        format!("{}{mail}", signature.to_header())
    }
}

/// The bot's config for `mode = "verify"` against `resolver`, with clients of their own.
fn verify_config(
    ws: &Workspace,
    resolver: std::net::SocketAddr,
    extra: &str,
) -> std::path::PathBuf {
    let config = ws.dir.path().join("verify.toml");
    let clients = "\n[[apps.mail_order_bot.clients]]\nid = \"C-8\"\nname = \"Strict Co\"\ndomains = [\"strictco.example\"]\n\n[[apps.mail_order_bot.clients]]\nid = \"C-9\"\nname = \"Old Co\"\ndomains = [\"oldco.example\"]\nallow_unauthenticated = true\n";
    let text = ws.config_text(2, 3, &format!("{clients}{extra}")).replacen(
        "sender_auth = { mode = \"off\" }",
        &format!("sender_auth = {{ mode = \"verify\", resolver = \"{resolver}\" }}"),
        1,
    );
    assert!(text.contains("mode = \"verify\""), "{text}");
    std::fs::write(&config, text).expect("config");
    config
}

#[test]
fn verify_mode_checks_dkim_and_dmarc_itself_against_the_resolver() {
    let ws = Workspace::new();
    let keys = tempfile::tempdir().expect("tempdir");
    let acme = Signer::ed25519("acme.example", "s1");
    let acme_mail = Signer::rsa("mail.acme.example", "s2048", keys.path());
    let attacker = Signer::ed25519("attacker.example", "a1");
    let strict_sub = Signer::ed25519("mail.strictco.example", "k1");
    let acme_l = Signer {
        body_length: true,
        ..acme.clone()
    };
    let mut records: Vec<(String, String)> = [&acme, &acme_mail, &attacker, &strict_sub]
        .iter()
        .map(|s| s.record(keys.path()))
        .collect();
    records.push(("_dmarc.acme.example".into(), "v=DMARC1; p=reject".into()));
    records.push((
        "_dmarc.nordic.example".into(),
        "v=DMARC1; p=reject; adkim=r".into(),
    ));
    records.push((
        "_dmarc.strictco.example".into(),
        "v=DMARC1; p=quarantine; adkim=s".into(),
    ));
    let records: Vec<(&str, &str)> = records
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let dns = plba_testkit::DnsServer::start(&records);

    let mail = |id: &str, from: &str| order_mail(id, from, &[("SKU-1", 1)]);
    let broken = acme
        .sign(&mail("broken-signature", "buyer@acme.example"))
        .replace("SKU-1", "SKU-9");
    let appended = {
        let signed = acme_l.sign(&mail("body-length", "buyer@acme.example"));
        format!("{signed}SKU-666 9999\r\n")
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "ed25519-pass",
            acme.sign(&mail("ed25519-pass", "buyer@acme.example")),
            "created",
            "",
        ),
        (
            "rsa-subdomain",
            acme_mail.sign(&mail("rsa-subdomain", "buyer@acme.example")),
            "created",
            "",
        ),
        (
            "forged-from",
            mail("forged-from", "buyer@acme.example"),
            "unauthenticated_sender",
            "no DKIM signature for acme.example",
        ),
        (
            "broken-signature",
            broken,
            "unauthenticated_sender",
            "body hash does not match",
        ),
        (
            "p-reject-domain",
            attacker.sign(&mail("p-reject-domain", "buyer@nordic.example")),
            "unauthenticated_sender",
            "d=attacker.example, not aligned with nordic.example; dmarc p=reject",
        ),
        (
            "strict-alignment",
            strict_sub.sign(&mail("strict-alignment", "po@strictco.example")),
            "unauthenticated_sender",
            "not aligned with strictco.example; dmarc p=quarantine",
        ),
        ("body-length", appended, "unauthenticated_sender", "l=' tag"),
        (
            "planted-results",
            format!(
                "Authentication-Results: mx.plba.test; dmarc=pass header.from=acme.example\r\n{}",
                mail("planted-results", "buyer@acme.example")
            ),
            "unauthenticated_sender",
            "no DKIM signature",
        ),
        (
            "legacy-client",
            mail("legacy-client", "orders@oldco.example"),
            "created",
            "",
        ),
    ];
    for (name, mail, _, _) in &cases {
        ws.deliver(name, mail);
    }
    let config = verify_config(&ws, dns.addr(), "");
    let (code, stdout, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(
        unseen(&ws),
        0,
        "every message has its outcome and is seen: {stdout}"
    );
    assert_outcomes(&ws, &cases);
}

#[test]
fn verify_mode_leaves_mail_unread_while_the_resolver_does_not_answer() {
    let ws = Workspace::new();
    // A UDP port nothing answers on (a bound socket that never replies): every lookup
    // times out, which is no verdict at all.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let signer = Signer::ed25519("acme.example", "s1");
    ws.deliver(
        "while-dns-is-down",
        &signer.sign(&order_mail(
            "while-dns-is-down",
            "buyer@acme.example",
            &[("SKU-1", 1)],
        )),
    );
    let config = verify_config(&ws, silent.local_addr().expect("addr"), "");
    let (code, stdout, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let outcomes = rt.block_on(async { ws.store().await.outcomes().await.expect("outcomes") });
    // Retried, never judged: after its attempts it is dead-lettered (failed, for a replay
    // once DNS answers), never unauthenticated_sender, never an order.
    assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
    assert_eq!(
        outcomes[0].outcome, "failed",
        "{outcomes:#?}\n{stdout}\n{stderr}"
    );
    assert!(
        outcomes[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("sender_auth verify: DKIM and DMARC lookups took longer")),
        "{outcomes:#?}"
    );
    assert_eq!(outcomes[0].order_id, None);
    assert_eq!(unseen(&ws), 1, "the mail stays unread: {stdout}\n{stderr}");
    let _ = code;
}
