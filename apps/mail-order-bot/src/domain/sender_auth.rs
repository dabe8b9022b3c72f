//! Whether a message's `From` is really its sender's: anyone on the internet can write any
//! `From`, so the client is resolved from it only once the receiving mail system vouches
//! for it.
//!
//! `mode = "authentication-results"` trusts the `Authentication-Results` header (RFC 8601)
//! that the receiving MTA adds: Microsoft 365 (Exchange Online Protection), Gmail, and
//! Postfix with OpenDKIM and OpenDMARC all add one on top of every message they accept. Only
//! the topmost header of the configured `authserv_id` counts (an MTA adds its own above
//! whatever the sender wrote; a header with another id is the sender's and is skipped). It
//! passes with `dmarc=pass` for the `From` domain, or an aligned `dkim=pass` (`header.d`) or
//! `spf=pass` (`smtp.mailfrom`). Alignment is relaxed: the domains are equal or one is a
//! subdomain of the other (a signer controls the DNS of the domain it signs for).
//!
//! Microsoft 365 writes its header without an authserv-id (`Authentication-Results:
//! spf=pass (sender IP is …) smtp.mailfrom=…; dkim=pass …; dmarc=pass … header.from=…`):
//! `authserv_id = "microsoft365"` matches that form, the topmost one.
//!
//! `mode = "verify"` checks DKIM and DMARC in the bot itself (`crate::dkim`), against the
//! configured `resolver`; the verdict it reaches is handed in as a [`Verdict`].

use serde::Deserialize;

/// The `authserv_id` that matches Microsoft 365's header, which names none.
pub const MICROSOFT_365: &str = "microsoft365";

/// Most `Authentication-Results` headers kept from one message, top first.
pub const MAX_HEADERS: usize = 16;
/// Longest header value kept, in bytes.
pub const MAX_HEADER_BYTES: usize = 4096;

/// How senders are authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Trust the receiving MTA's `Authentication-Results` of `authserv_id`.
    AuthenticationResults,
    /// Verify DKIM signatures and the DMARC policy in the bot, asking `resolver`.
    Verify,
    /// No check: any `From` is believed. Chosen explicitly, never a default.
    Off,
}

/// `[apps.mail_order_bot.sender_auth]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderAuthConfig {
    /// `authentication-results` or `off`; there is no default: a configuration must choose.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// The authserv-id of the receiving MTA whose header is trusted (`mx.google.com` for
    /// Gmail, the `AuthservID` of OpenDKIM/OpenDMARC for Postfix, `microsoft365` for
    /// Microsoft 365).
    #[serde(default)]
    pub authserv_id: Option<String>,
    /// `mode = "verify"`: the DNS resolver asked for DKIM keys and DMARC policies, as
    /// `ip` or `ip:port` (UDP and TCP); the system's (`/etc/resolv.conf`) when absent.
    #[serde(default)]
    pub resolver: Option<String>,
}

/// What the bot's own DKIM and DMARC check (`mode = "verify"`) found for one message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    /// A verified signature aligned with `domain`, the message's `From` domain.
    Pass {
        /// The `From` domain the signature vouches for.
        domain: String,
        /// What passed, for the record.
        why: String,
    },
    /// Not authenticated, and why.
    Fail(String),
    /// A lookup failed for the time being: try the message again later.
    Unavailable(String),
}

impl SenderAuthConfig {
    /// What is wrong with the section, as (key, problem).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match (self.mode, self.authserv_id.as_deref().map(str::trim)) {
            (None, _) => out.push((
                "mode",
                "choose how senders are authenticated: \"authentication-results\" (with the \
                 authserv_id of your receiving MTA), \"verify\" (the bot checks DKIM and DMARC) \
                 or \"off\" (any From is believed: forged mail makes orders)"
                    .to_owned(),
            )),
            (Some(Mode::AuthenticationResults), None | Some("")) => out.push((
                "authserv_id",
                "required with mode = \"authentication-results\": the id your receiving MTA \
                 writes first in its Authentication-Results header (mx.google.com for Gmail, \
                 microsoft365 for Microsoft 365)"
                    .to_owned(),
            )),
            (Some(Mode::AuthenticationResults), Some(id))
                if !id.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                out.push(("authserv_id", format!("{id:?} is not a host name")));
            }
            _ => {}
        }
        if let Some(resolver) = &self.resolver {
            if self.mode != Some(Mode::Verify) {
                out.push((
                    "resolver",
                    "only mode = \"verify\" asks a resolver".to_owned(),
                ));
            } else if resolver_addr(resolver).is_none() {
                out.push((
                    "resolver",
                    format!("{resolver:?} is not an IP address, with or without a :port"),
                ));
            }
        }
        out
    }

    /// The resolver `mode = "verify"` asks, if one is named (and valid).
    pub fn resolver_addr(&self) -> Option<std::net::SocketAddr> {
        self.resolver.as_deref().and_then(resolver_addr)
    }

    /// The check this section asks for.
    pub fn checker(&self) -> Checker {
        match (self.mode, &self.authserv_id) {
            (Some(Mode::Off), _) => Checker::Off,
            (Some(Mode::Verify), _) => Checker::Verify,
            (Some(Mode::AuthenticationResults), Some(id)) => {
                Checker::AuthenticationResults(id.trim().to_ascii_lowercase())
            }
            // An unchecked configuration fails closed: no sender is authenticated.
            _ => Checker::Unconfigured,
        }
    }
}

/// A configured check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checker {
    /// Every `From` is believed.
    Off,
    /// The topmost `Authentication-Results` of this authserv-id decides.
    AuthenticationResults(String),
    /// The bot's own DKIM and DMARC verdict decides.
    Verify,
    /// No mode was chosen (a configuration that skipped validation): nothing passes.
    Unconfigured,
}

impl Checker {
    /// `Ok(what passed)` when `sender` is authenticated by `headers` (the message's
    /// `Authentication-Results` values, top first); `Err(why not)` otherwise.
    pub fn check(&self, sender: &str, headers: &[String]) -> Result<String, String> {
        self.check_with(sender, headers, None)
    }

    /// [`check`](Self::check), with the bot's own verdict for `mode = "verify"`.
    pub fn check_with(
        &self,
        sender: &str,
        headers: &[String],
        verified: Option<&Verdict>,
    ) -> Result<String, String> {
        let domain = sender
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or_default();
        match self {
            Self::Off => Ok("sender_auth off".into()),
            Self::Unconfigured => Err("sender authentication is not configured".into()),
            Self::Verify => match verified {
                Some(Verdict::Pass {
                    domain: signed,
                    why,
                }) if *signed == domain => Ok(why.clone()),
                Some(Verdict::Pass { domain: signed, .. }) => Err(format!(
                    "the signature vouches for {signed}, not for the sender's {domain}"
                )),
                Some(Verdict::Fail(why) | Verdict::Unavailable(why)) => Err(why.clone()),
                None => Err("the message was not verified".into()),
            },
            Self::AuthenticationResults(id) => {
                let Some(results) =
                    headers
                        .iter()
                        .map(|h| parse(h))
                        .find(|r| match &r.authserv_id {
                            None => id == MICROSOFT_365,
                            Some(named) => named == id && id != MICROSOFT_365,
                        })
                else {
                    return Err(format!("no Authentication-Results header from {id}"));
                };
                verdict(&results, &domain)
            }
        }
    }
}

/// One result of a header: method, result, properties as (`ptype.property`, value).
pub type MethodResult = (String, String, Vec<(String, String)>);

/// One `Authentication-Results` header, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Results {
    /// Its authserv-id, lower-cased; `None` for Microsoft 365's form, which names none.
    pub authserv_id: Option<String>,
    /// Each result: (method, result, properties as (`ptype.property`, value)), lower-cased.
    pub results: Vec<MethodResult>,
}

/// `value` without RFC 5322 comments, with quoted strings unquoted.
fn uncomment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut depth = 0usize;
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            if depth == 0 {
                out.push(c);
            }
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            c if depth == 0 => out.push(if c.is_whitespace() { ' ' } else { c }),
            _ => {}
        }
    }
    out
}

/// Parses one header value (RFC 8601 §2.2), leniently: what cannot be read is left out.
pub fn parse(value: &str) -> Results {
    let clean = uncomment(value).to_ascii_lowercase();
    let mut pieces = clean.split(';').map(str::trim);
    let first = pieces.next().unwrap_or("");
    let mut out = Results::default();
    let mut rest: Vec<&str> = pieces.collect();
    match first.split_whitespace().next() {
        // Microsoft 365: the first piece is already a result.
        Some(token) if token.contains('=') => rest.insert(0, first),
        Some(token) => out.authserv_id = Some(token.to_owned()),
        None => {}
    }
    for piece in rest {
        let mut words = piece.split_whitespace();
        let Some((method, result)) = words.next().and_then(|w| w.split_once('=')) else {
            continue;
        };
        // `dkim/1=pass`: a method version.
        let method = method.split('/').next().unwrap_or(method).to_owned();
        let props = words
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| k.contains('.'))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        out.results.push((method, result.to_owned(), props));
    }
    out
}

/// `ip` or `ip:port` (53 by default).
fn resolver_addr(value: &str) -> Option<std::net::SocketAddr> {
    let value = value.trim();
    value.parse().ok().or_else(|| {
        value
            .parse()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, 53))
    })
}

/// Whether `a` and `b` are aligned (relaxed): equal, or one a subdomain of the other.
pub fn aligned(a: &str, b: &str) -> bool {
    let a = a.trim_end_matches('.');
    let b = b.trim_end_matches('.');
    if a.is_empty() || b.is_empty() {
        return false;
    }
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    long == short || (long.ends_with(short) && long[..long.len() - short.len()].ends_with('.'))
}

fn prop<'r>(props: &'r [(String, String)], key: &str) -> Option<&'r str> {
    props
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The domain of an address or a domain.
fn domain_of(value: &str) -> &str {
    value.rsplit_once('@').map_or(value, |(_, d)| d)
}

fn verdict(results: &Results, from_domain: &str) -> Result<String, String> {
    let find = |method: &'static str| results.results.iter().filter(move |(m, _, _)| m == method);
    for (_, result, props) in find("dmarc") {
        let for_from = prop(props, "header.from").is_none_or(|d| aligned(d, from_domain));
        match result.as_str() {
            "pass" if for_from => return Ok(format!("dmarc=pass for {from_domain}")),
            "fail" => return Err(format!("dmarc=fail for {from_domain}")),
            _ => {}
        }
    }
    for (_, result, props) in find("dkim") {
        let signer = prop(props, "header.d").or_else(|| prop(props, "header.i").map(domain_of));
        if result == "pass" {
            if let Some(d) = signer.filter(|d| aligned(d, from_domain)) {
                return Ok(format!("dkim=pass, d={d} aligned with {from_domain}"));
            }
        }
    }
    for (_, result, props) in find("spf") {
        let mailfrom = prop(props, "smtp.mailfrom").map(domain_of);
        if result == "pass" {
            if let Some(d) = mailfrom.filter(|d| aligned(d, from_domain)) {
                return Ok(format!("spf=pass, mailfrom {d} aligned with {from_domain}"));
            }
        }
    }
    let seen: Vec<String> = results
        .results
        .iter()
        .filter(|(m, _, _)| matches!(m.as_str(), "dmarc" | "dkim" | "spf"))
        .map(|(m, r, props)| {
            let domain = prop(props, "header.d")
                .or_else(|| prop(props, "header.from"))
                .or_else(|| prop(props, "smtp.mailfrom").map(domain_of));
            match domain {
                Some(d) => format!("{m}={r} ({d})"),
                None => format!("{m}={r}"),
            }
        })
        .collect();
    Err(if seen.is_empty() {
        format!("no DMARC, DKIM or SPF result for {from_domain}")
    } else {
        format!(
            "no passing result aligned with {from_domain}: {}",
            seen.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ar(id: &str) -> Checker {
        Checker::AuthenticationResults(id.to_owned())
    }

    // Gmail's header, as in Google's documentation of message headers.
    const GMAIL: &str = "mx.google.com;\r\n       dkim=pass header.i=@nordictools.example header.s=20230601 header.b=AbCdEf12;\r\n       spf=pass (google.com: domain of purchasing@nordictools.example designates 203.0.113.5 as permitted sender) smtp.mailfrom=purchasing@nordictools.example;\r\n       dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=nordictools.example";

    // Microsoft 365's header, as in Microsoft's "Anti-spam message headers" page: no
    // authserv-id.
    const M365: &str = "spf=pass (sender IP is 203.0.113.5)\r\n smtp.mailfrom=nordictools.example; dkim=pass (signature was verified)\r\n header.d=nordictools.example;dmarc=pass action=none\r\n header.from=nordictools.example;compauth=pass reason=100";

    // OpenDMARC after OpenDKIM on Postfix.
    const POSTFIX: &str =
        "mx.plba.test; dmarc=pass (p=reject dis=none) header.from=nordictools.example";

    #[test]
    fn the_providers_documented_headers_pass() {
        let sender = "purchasing@nordictools.example";
        assert!(ar("mx.google.com")
            .check(sender, &[GMAIL.into()])
            .is_ok_and(|w| w.contains("dmarc=pass")));
        assert!(ar(MICROSOFT_365).check(sender, &[M365.into()]).is_ok());
        assert!(ar("mx.plba.test").check(sender, &[POSTFIX.into()]).is_ok());
    }

    #[test]
    fn a_forged_from_fails() {
        let forged = "mx.google.com; dkim=pass header.i=@attacker.example; spf=pass smtp.mailfrom=bounce@attacker.example; dmarc=fail (p=REJECT) header.from=nordictools.example";
        let why = ar("mx.google.com")
            .check("purchasing@nordictools.example", &[forged.into()])
            .expect_err("not authenticated");
        assert!(why.contains("dmarc=fail"), "{why}");
        // No DMARC verdict at all: an unaligned d= or mailfrom does not vouch.
        let unaligned = "mx.google.com; dkim=pass header.d=attacker.example; spf=pass smtp.mailfrom=attacker.example";
        let why = ar("mx.google.com")
            .check("purchasing@nordictools.example", &[unaligned.into()])
            .expect_err("not authenticated");
        assert!(why.contains("dkim=pass (attacker.example)"), "{why}");
        // A look-alike domain is not a subdomain.
        let lookalike = "mx.google.com; dkim=pass header.d=evilnordictools.example";
        assert!(ar("mx.google.com")
            .check("a@nordictools.example", &[lookalike.into()])
            .is_err());
    }

    #[test]
    fn alignment_is_relaxed_to_subdomains() {
        let signed = "mx.plba.test; dkim=pass header.d=nordictools.example";
        assert!(ar("mx.plba.test")
            .check("po@eu.nordictools.example", &[signed.into()])
            .is_ok());
        let spf = "mx.plba.test; spf=pass smtp.mailfrom=bounces@mail.nordictools.example";
        assert!(ar("mx.plba.test")
            .check("po@nordictools.example", &[spf.into()])
            .is_ok());
    }

    #[test]
    fn only_the_topmost_header_of_the_trusted_id_counts() {
        let sender = "purchasing@nordictools.example";
        let real = "mx.plba.test; dmarc=fail header.from=nordictools.example".to_owned();
        let planted = "mx.plba.test; dmarc=pass header.from=nordictools.example".to_owned();
        let other = "evil.example; dmarc=pass header.from=nordictools.example".to_owned();
        // The sender's copy below the MTA's own: the MTA's decides.
        assert!(ar("mx.plba.test")
            .check(sender, &[real.clone(), planted.clone()])
            .is_err());
        // A header of another id above it is skipped.
        assert!(ar("mx.plba.test")
            .check(sender, &[other.clone(), real.clone()])
            .is_err());
        // Only another id's: none from the trusted MTA.
        let why = ar("mx.plba.test")
            .check(sender, &[other])
            .expect_err("not authenticated");
        assert!(why.contains("no Authentication-Results header from mx.plba.test"));
        // Microsoft 365: a sender-written header with an id is not Microsoft's.
        assert!(ar(MICROSOFT_365).check(sender, &[planted]).is_err());
    }

    #[test]
    fn off_passes_and_unconfigured_fails_closed() {
        assert!(Checker::Off.check("a@b.example", &[]).is_ok());
        assert!(Checker::Unconfigured.check("a@b.example", &[]).is_err());
        let config = SenderAuthConfig::default();
        assert_eq!(config.problems()[0].0, "mode");
        assert_eq!(config.checker(), Checker::Unconfigured);
        let config = SenderAuthConfig {
            mode: Some(Mode::AuthenticationResults),
            authserv_id: Some(" ".into()),
            resolver: None,
        };
        assert_eq!(config.problems()[0].0, "authserv_id");
    }

    #[test]
    fn comments_quotes_and_versions_are_read() {
        let r = parse("mx.example (our MX) 1; dkim/1=pass (good \"quoted ; ) paren\") header.d=\"a.example\"; none");
        assert_eq!(r.authserv_id.as_deref(), Some("mx.example"));
        assert_eq!(r.results[0].0, "dkim");
        assert_eq!(
            r.results[0].2,
            vec![("header.d".to_owned(), "a.example".to_owned())]
        );
    }
}
