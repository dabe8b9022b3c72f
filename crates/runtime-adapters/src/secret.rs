//! Checks of secrets an operator configures (webhook secrets, control-plane tokens).

/// Values shipped in examples and documentation; a secret containing one is refused.
const PLACEHOLDERS: &[&str] = &[
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "placeholder",
    "your-secret",
    "your-token",
    "example",
];

/// Why `secret` must not be used, if so: empty, shorter than `min` bytes, a placeholder
/// shipped in examples (`change-me`, `example`, ...), or one byte repeated. Never quotes it.
pub fn weakness(secret: &[u8], min: usize) -> Option<String> {
    let text = String::from_utf8_lossy(secret).to_ascii_lowercase();
    if text.trim().is_empty() {
        return Some("is empty".into());
    }
    if secret.len() < min {
        return Some(format!(
            "has {} bytes; at least {min} are needed (openssl rand -hex 32)",
            secret.len()
        ));
    }
    if PLACEHOLDERS.iter().any(|p| text.contains(p)) || secret.iter().all(|b| *b == secret[0]) {
        return Some("is a placeholder: generate one (openssl rand -hex 32)".into());
    }
    None
}

/// Query parameters whose values are secrets, by a part of their name.
const SECRET_PARAMS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "key",
    "credential",
    "sig",
];

/// `url` with its password and secret query parameters replaced by `[redacted]`: the
/// userinfo ends at the last `@` before the query (a password may hold `@`), and
/// `?password=…`, `sslpassword=…`, `token=…` and the like are hidden too.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
    let (before_query, query) = rest.split_at(query_at);
    let authority = match before_query.rfind('@') {
        Some(at) => {
            let (userinfo, host) = before_query.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:[redacted]{host}"),
                None => before_query.to_owned(),
            }
        }
        None => before_query.to_owned(),
    };
    let query = match query.strip_prefix('?') {
        Some(params) => {
            let (params, fragment) = params
                .split_once('#')
                .map_or((params, None), |(p, f)| (p, Some(f)));
            let params: Vec<String> = params
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _))
                        if SECRET_PARAMS
                            .iter()
                            .any(|s| name.to_ascii_lowercase().contains(s)) =>
                    {
                        format!("{name}=[redacted]")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            match fragment {
                Some(f) => format!("?{}#{f}", params.join("&")),
                None => format!("?{}", params.join("&")),
            }
        }
        None => query.to_owned(),
    };
    format!("{scheme}://{authority}{query}")
}

#[cfg(test)]
mod tests {
    use super::{redact_url, weakness};

    #[test]
    fn passwords_in_urls_are_hidden_wherever_they_are() {
        assert_eq!(
            redact_url("postgres://bot:hunter2@db/orders"),
            "postgres://bot:[redacted]@db/orders"
        );
        // A password holding `@` (not percent-encoded, as people write it).
        assert_eq!(
            redact_url("postgres://bot:p@ss@w0rd@db:5432/orders"),
            "postgres://bot:[redacted]@db:5432/orders"
        );
        assert_eq!(
            redact_url("postgres://db/orders?user=bot&password=hunter2&sslmode=verify-full"),
            "postgres://db/orders?user=bot&password=[redacted]&sslmode=verify-full"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1/?token=abc#x"),
            "redis://127.0.0.1/?token=[redacted]#x"
        );
        assert_eq!(
            redact_url("sqlite://var/orders.db"),
            "sqlite://var/orders.db"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        for url in [
            "postgres://bot:p@ss@w0rd@db/orders",
            "amqp://guest:s3cr3t@rabbit:5672/%2f?password=s3cr3t",
        ] {
            let shown = redact_url(url);
            assert!(
                !shown.contains("w0rd") && !shown.contains("s3cr3t"),
                "{shown}"
            );
        }
    }

    #[test]
    fn empty_short_and_placeholder_secrets_are_refused() {
        assert_eq!(weakness(b"", 16).as_deref(), Some("is empty"));
        assert_eq!(weakness(b"   ", 16).as_deref(), Some("is empty"));
        assert!(weakness(b"short", 16).is_some_and(|w| w.starts_with("has 5 bytes")));
        assert!(weakness(b"change-me-admin-0123456789abcdef", 16).is_some());
        assert!(weakness(&[b'a'; 40], 16).is_some());
        assert_eq!(weakness(b"3f9c1e7b2a6d4f80b5c2e9a1d7f3b6c4", 32), None);
    }
}
