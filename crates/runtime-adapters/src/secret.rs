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

#[cfg(test)]
mod tests {
    use super::weakness;

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
