//! Reading one raw email into the facts the bot needs.

use mail_parser::{MessageParser, MimeHeaders};
use sha2::{Digest, Sha256};

use super::extract::{lines_from_csv, lines_from_text, CsvLimits, Extraction};

/// The facts of one email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailFacts {
    /// `mid:<Message-ID>`, or `sha256:<hex of the raw bytes>` when there is none.
    pub identity: String,
    /// SHA-256 of the raw bytes, hex.
    pub content_sha256: String,
    /// The bare From address, lower-cased; never the display name.
    pub sender: Option<String>,
    /// The decoded subject.
    pub subject: Option<String>,
    /// Lines found in the body and in CSV attachments.
    pub extraction: Extraction,
}

/// How many `message/rfc822` parts the raw bytes declare, counted without parsing
/// (case-insensitive). mail-parser 0.11 overflows its stack on deeply nested messages and
/// aborts the process in `Drop`, where no `catch_unwind` can help, so depth must be bounded
/// before the parser ever sees the bytes. Counting every declaration bounds the depth.
pub fn rfc822_parts(raw: &[u8]) -> usize {
    const NEEDLE: &[u8] = b"message/rfc822";
    raw.windows(NEEDLE.len())
        .filter(|w| w.eq_ignore_ascii_case(NEEDLE))
        .count()
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The identity of a raw message: its Message-ID, else a hash of its bytes.
pub fn identity_of(raw: &[u8]) -> String {
    let parsed = MessageParser::default().parse_headers(raw);
    parsed
        .as_ref()
        .and_then(|m| usable_message_id(m.message_id()))
        .unwrap_or_else(|| format!("sha256:{}", sha256_hex(raw)))
}

fn usable_message_id(id: Option<&str>) -> Option<String> {
    let id = id?
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    let sane = !id.is_empty() && id.len() <= 998 && !id.chars().any(char::is_whitespace);
    sane.then(|| format!("mid:{id}"))
}

fn is_csv(part: &mail_parser::MessagePart<'_>) -> bool {
    let by_type = part.content_type().is_some_and(|ct| {
        let sub = ct.subtype().unwrap_or("").to_ascii_lowercase();
        sub == "csv" || sub == "comma-separated-values"
    });
    let by_name = part
        .attachment_name()
        .is_some_and(|n| n.to_ascii_lowercase().ends_with(".csv"));
    by_type || by_name
}

/// Parses `raw` and extracts its order lines. Never panics on bad input: what cannot be
/// read is simply absent from the facts.
pub fn read_mail(raw: &[u8], csv_limits: CsvLimits) -> MailFacts {
    let content_sha256 = sha256_hex(raw);
    let Some(message) = MessageParser::default().parse(raw) else {
        return MailFacts {
            identity: format!("sha256:{content_sha256}"),
            content_sha256,
            sender: None,
            subject: None,
            extraction: Extraction::default(),
        };
    };
    let identity = usable_message_id(message.message_id())
        .unwrap_or_else(|| format!("sha256:{content_sha256}"));
    let sender = message
        .from()
        .and_then(|a| a.iter().find_map(|addr| addr.address()))
        .map(|a| a.trim().to_lowercase())
        .filter(|a| a.contains('@'));
    let subject = message.subject().map(str::to_owned);

    let mut extraction = Extraction::default();
    for i in 0..message.text_body_count() {
        if let Some(text) = message.body_text(i) {
            extraction.extend(lines_from_text(&text));
        }
    }
    for (i, part) in message.attachments().enumerate() {
        if !is_csv(part) {
            continue;
        }
        let name = part
            .attachment_name()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("attachment-{}.csv", i + 1));
        let text = String::from_utf8_lossy(part.contents());
        extraction.extend(lines_from_csv(&text, &name, csv_limits));
    }
    MailFacts {
        identity,
        content_sha256,
        sender,
        subject,
        extraction,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_prefers_the_message_id() {
        let raw = b"Message-ID: <abc@x.example>\r\nFrom: a@b.example\r\n\r\nhi";
        assert_eq!(identity_of(raw), "mid:abc@x.example");
        assert_eq!(
            read_mail(raw, CsvLimits::default()).identity,
            "mid:abc@x.example"
        );
        let none = b"From: a@b.example\r\n\r\nhi";
        assert!(identity_of(none).starts_with("sha256:"));
        assert_eq!(
            identity_of(none),
            read_mail(none, CsvLimits::default()).identity
        );
    }

    #[test]
    fn the_display_name_is_never_the_sender() {
        let raw = "From: \"orders@acme.example\" <mallory@evil.example>\r\n\r\nSKU-1 x 1";
        let facts = read_mail(raw.as_bytes(), CsvLimits::default());
        assert_eq!(facts.sender.as_deref(), Some("mallory@evil.example"));
    }

    #[test]
    fn rfc822_parts_are_counted_in_any_case() {
        assert_eq!(
            rfc822_parts(b"Content-Type: Message/RFC822\r\n\r\nContent-Type: message/rfc822"),
            2
        );
        assert_eq!(rfc822_parts(b"Content-Type: text/plain"), 0);
    }

    #[test]
    fn garbage_gives_facts_not_panics() {
        for raw in [
            &b""[..],
            b"\xff\xfe\x00",
            b"From: \xff\xff\r\nSubject: \xc3\x28\r\n\r\n\xff",
            b"Content-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x\r\n--x--",
        ] {
            let facts = read_mail(raw, CsvLimits::default());
            assert!(facts.identity.starts_with("sha256:") || facts.identity.starts_with("mid:"));
            assert!(facts.extraction.lines.is_empty());
        }
    }
}
