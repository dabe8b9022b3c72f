//! `sender_auth.mode = "verify"`: the bot checks a message's DKIM signatures and its `From`
//! domain's DMARC policy itself, with the `mail-auth` crate, asking the configured DNS
//! resolver (the system's by default) for the keys and the policy.
//!
//! A message passes when a DKIM signature verifies whose `d=` is aligned with the `From`
//! domain: equal to it under `adkim=s`, equal or a parent or subdomain otherwise (the same
//! relaxed alignment `mode = "authentication-results"` applies). SPF needs the connecting
//! client's address, which only the receiving MTA knows, so it is not checked here: a
//! sender that only publishes SPF needs the receiving MTA's verdict (`authentication-results`)
//! or the client's `allow_unauthenticated`.
//!
//! Refused, whatever else verifies: a signature with a body length (`l=`, which lets anyone
//! append a body of their own), one that does not sign `From`, more than
//! [`MAX_SIGNATURES`] signatures, and `From` headers naming more than one domain. A lookup
//! that fails for the time being (a timeout, `SERVFAIL`) is [`Verdict::Unavailable`]: the
//! message is tried again later, never judged on it.

use std::net::SocketAddr;
use std::time::Duration;

use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Alignment, Policy};
use mail_auth::hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::system_conf::read_system_conf;
use mail_auth::{AuthenticatedMessage, DkimResult, DmarcResult, MessageAuthenticator, SpfOutput};

use crate::domain::sender_auth::{aligned, Verdict};

/// Most DKIM signatures looked at in one message: each costs DNS lookups and a signature
/// check; real mail carries one to three.
pub const MAX_SIGNATURES: usize = 5;

/// How long one DNS query may take, and how long one message's lookups may take in all.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks DKIM and DMARC with one resolver.
pub struct Verifier {
    auth: Result<MessageAuthenticator, String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("ready", &self.auth.is_ok())
            .finish()
    }
}

impl Verifier {
    /// A verifier asking `resolver` (UDP and TCP), or the system's resolvers
    /// (`/etc/resolv.conf`) when `None`. A system configuration that cannot be read makes
    /// every verdict [`Verdict::Unavailable`] (logged once here): mail waits, unjudged.
    pub fn new(resolver: Option<SocketAddr>) -> Self {
        let conf = match resolver {
            Some(addr) => Ok((
                ResolverConfig::from_parts(
                    None,
                    vec![],
                    NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
                ),
                ResolverOpts::default(),
            )),
            None => read_system_conf().map_err(|e| format!("reading /etc/resolv.conf: {e}")),
        };
        let auth = conf.and_then(|(config, mut opts)| {
            opts.timeout = QUERY_TIMEOUT;
            opts.attempts = 2;
            MessageAuthenticator::new(config, opts).map_err(|e| format!("the DNS resolver: {e}"))
        });
        if let Err(e) = &auth {
            tracing::error!(error = %e, "sender_auth verify: no DNS resolver; mail waits unjudged");
        }
        Self { auth }
    }

    /// The verdict on one raw message.
    pub async fn verify(&self, raw: &[u8]) -> Verdict {
        let auth = match &self.auth {
            Ok(auth) => auth,
            Err(e) => return Verdict::Unavailable(e.clone()),
        };
        match tokio::time::timeout(MESSAGE_TIMEOUT, verify(auth, raw)).await {
            Ok(verdict) => verdict,
            Err(_) => Verdict::Unavailable(format!(
                "DKIM and DMARC lookups took longer than {} s",
                MESSAGE_TIMEOUT.as_secs()
            )),
        }
    }
}

async fn verify(auth: &MessageAuthenticator, raw: &[u8]) -> Verdict {
    let Some(message) = AuthenticatedMessage::parse(raw) else {
        return Verdict::Fail("the message's headers cannot be read".into());
    };
    let mut domains: Vec<String> = message
        .from
        .iter()
        .filter_map(|a| a.rsplit_once('@'))
        .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    domains.dedup();
    let from = match domains.as_slice() {
        [one] => one.clone(),
        [] => return Verdict::Fail("no From domain to verify".into()),
        _ => return Verdict::Fail("From names more than one domain".into()),
    };
    if message.dkim_headers.is_empty() {
        return Verdict::Fail(format!("no DKIM signature for {from}"));
    }
    if message.dkim_headers.len() > MAX_SIGNATURES {
        return Verdict::Fail(format!(
            "{} DKIM signatures, above the {MAX_SIGNATURES} looked at",
            message.dkim_headers.len()
        ));
    }
    let dkim = auth.verify_dkim(&message).await;
    let no_spf = SpfOutput::new(String::new());
    let dmarc = auth
        .verify_dmarc(DmarcParameters::new(&message, &dkim, "", &no_spf))
        .await;
    if let DmarcResult::TempError(e) = dmarc.dkim_result() {
        return Verdict::Unavailable(format!("the DMARC policy of {from}: {e}"));
    }
    let strict = dmarc
        .dmarc_record()
        .is_some_and(|r| r.adkim == Alignment::Strict);
    let policy = dmarc.dmarc_record().map(|r| match r.p {
        Policy::Reject => "p=reject",
        Policy::Quarantine => "p=quarantine",
        Policy::None => "p=none",
        Policy::Unspecified => "no p=",
    });
    let mut seen = Vec::new();
    let mut temporary = None;
    for output in &dkim {
        let Some(sig) = output.signature() else {
            seen.push(format!("dkim={}", name(output.result())));
            continue;
        };
        let d = sig.d.trim_end_matches('.').to_ascii_lowercase();
        match output.result() {
            DkimResult::Pass if sig.l > 0 => {
                seen.push(format!(
                    "dkim=pass d={d} with a body length (l=), not trusted"
                ));
            }
            DkimResult::Pass if !sig.h.iter().any(|h| h.eq_ignore_ascii_case("from")) => {
                seen.push(format!("dkim=pass d={d} without From signed, not trusted"));
            }
            DkimResult::Pass if (strict && d == from) || (!strict && aligned(&d, &from)) => {
                let policy = policy.map(|p| format!(", dmarc {p}")).unwrap_or_default();
                return Verdict::Pass {
                    domain: from.clone(),
                    why: format!("dkim=pass, d={d} aligned with {from} (verified){policy}"),
                };
            }
            DkimResult::Pass => seen.push(format!("dkim=pass d={d}, not aligned with {from}")),
            DkimResult::TempError(e) => {
                temporary.get_or_insert_with(|| format!("the DKIM key of {d}: {e}"));
            }
            other => seen.push(format!("dkim={} d={d}", name(other))),
        }
    }
    if let Some(why) = temporary {
        return Verdict::Unavailable(why);
    }
    let policy = policy.map(|p| format!("; dmarc {p}")).unwrap_or_default();
    Verdict::Fail(format!(
        "no verified DKIM signature aligned with {from}: {}{policy}",
        seen.join(", ")
    ))
}

fn name(result: &DkimResult) -> String {
    match result {
        DkimResult::Pass => "pass".into(),
        DkimResult::Neutral(e) => format!("neutral ({e})"),
        DkimResult::Fail(e) => format!("fail ({e})"),
        DkimResult::PermError(e) => format!("permerror ({e})"),
        DkimResult::TempError(e) => format!("temperror ({e})"),
        DkimResult::None => "none".into(),
    }
}
