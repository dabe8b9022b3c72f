//! The MIME structure of a raw message, measured before any parser sees it.
//!
//! mail-parser 0.11 nests a message part of any kind it recognises (`message/rfc822`,
//! `message/global`, and every child of a `multipart/digest`, which needs no header at all)
//! as a message inside the message, decodes a transfer-encoded message part and parses what
//! it holds (three levels deep), and frees the result recursively: a mail of 50,000 nested
//! parts overflowed a worker's stack and aborted the process. Its time also grows with the
//! square of multipart nesting. So the structure is walked here first, in one linear pass
//! that stops at the first limit hit:
//!
//! - every entity is counted (`max_mime_parts`);
//! - every message part of every kind, digest children and message parts found inside
//!   transfer-encoded ones included (`max_rfc822_nesting`);
//! - every multipart (`max_multipart_parts`);
//! - every transfer-encoded message part (`max_encoded_message_parts`), whose decoded bytes
//!   are walked the same way, as deep as the parser would go.
//!
//! Header fields are read leniently (folding, comments and white space inside a media type
//! are ignored, names in any case), so that whatever the parser takes for a structure, this
//! walk counts too; counting a little more than the parser would is safe.

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;

use super::framing::{boundary_of, lines_with_ends};

/// How deep the parser reads transfer-encoded message parts (mail-parser's own limit).
const ENCODED_DEPTH: usize = 3;

/// The limits on a message's structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructureLimits {
    /// Most entities (the message, every part, every nested message).
    pub max_mime_parts: usize,
    /// Most message parts of any kind (`message/rfc822`, `message/global`, digest children).
    pub max_message_parts: usize,
    /// Most `multipart/*` entities.
    pub max_multipart_parts: usize,
    /// Most transfer-encoded (base64, quoted-printable) message parts.
    pub max_encoded_message_parts: usize,
}

/// What a walk counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Structure {
    /// Entities.
    pub parts: usize,
    /// Message parts of any kind.
    pub messages: usize,
    /// Multipart entities.
    pub multiparts: usize,
    /// Transfer-encoded message parts.
    pub encoded_messages: usize,
}

impl Structure {
    fn over(&self, limits: &StructureLimits) -> Option<String> {
        let counted = [
            ("max_mime_parts", "MIME", self.parts, limits.max_mime_parts),
            (
                "max_rfc822_nesting",
                "message",
                self.messages,
                limits.max_message_parts,
            ),
            (
                "max_multipart_parts",
                "multipart",
                self.multiparts,
                limits.max_multipart_parts,
            ),
            (
                "max_encoded_message_parts",
                "transfer-encoded message",
                self.encoded_messages,
                limits.max_encoded_message_parts,
            ),
        ];
        counted
            .into_iter()
            .find(|c| c.2 > c.3)
            .map(|(key, what, found, max)| {
                format!("{key}: more than {max} {what} parts (counted {found} before stopping)")
            })
    }
}

/// Walks `raw`'s structure; `Err` names the first limit hit, as the configuration does.
pub fn measure(raw: &[u8], limits: &StructureLimits) -> Result<Structure, String> {
    let mut counts = Structure::default();
    walk(raw, 0, limits, &mut counts)?;
    Ok(counts)
}

/// What an entity is, from its header block.
enum Kind {
    Multipart {
        boundary: Vec<u8>,
        digest: bool,
    },
    /// A message part whose body is the nested message's header block.
    Message,
    /// A message part the parser decodes and parses (base64 or quoted-printable).
    EncodedMessage {
        base64: bool,
    },
    Leaf,
}

enum State {
    /// Reading an entity's header block; `in_digest`: a child of a `multipart/digest`.
    Headers { block: Vec<u8>, in_digest: bool },
    /// In a body; an encoded message part's body is kept to be walked once it ends.
    Body { encoded: Option<(bool, Vec<u8>)> },
}

/// Longest header block kept for classifying one entity; beyond, its content type has been
/// seen or the block is not one.
const MAX_HEADER_BLOCK: usize = 64 * 1024;

fn walk(
    raw: &[u8],
    level: usize,
    limits: &StructureLimits,
    counts: &mut Structure,
) -> Result<(), String> {
    let deepest_open = limits.max_multipart_parts.saturating_add(1);
    let mut open: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut state = State::Headers {
        block: Vec::new(),
        in_digest: false,
    };
    counts.parts += 1;
    for (_, line) in lines_with_ends(raw) {
        if let Some((depth, closing)) = boundary_line(line, &open) {
            if let State::Body {
                encoded: Some((base64, body)),
            } = std::mem::replace(&mut state, State::Body { encoded: None })
            {
                walk_encoded(&body, base64, level, limits, counts)?;
            }
            open.truncate(depth + 1);
            if closing {
                open.pop();
                state = State::Body { encoded: None };
            } else {
                counts.parts += 1;
                state = State::Headers {
                    block: Vec::new(),
                    in_digest: open.last().is_some_and(|(_, digest)| *digest),
                };
            }
            if let Some(over) = counts.over(limits) {
                return Err(over);
            }
            continue;
        }
        state = match state {
            State::Headers {
                mut block,
                in_digest,
            } => {
                if !line.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                    if block.len() < MAX_HEADER_BLOCK {
                        block.extend_from_slice(line);
                    }
                    State::Headers { block, in_digest }
                } else {
                    match classify(&block, in_digest) {
                        Kind::Multipart { boundary, digest } => {
                            counts.multiparts += 1;
                            if open.len() < deepest_open {
                                open.push((boundary, digest));
                            }
                            State::Body { encoded: None }
                        }
                        Kind::Message => {
                            counts.messages += 1;
                            counts.parts += 1;
                            State::Headers {
                                block: Vec::new(),
                                in_digest: false,
                            }
                        }
                        Kind::EncodedMessage { base64 } => {
                            counts.messages += 1;
                            counts.encoded_messages += 1;
                            State::Body {
                                encoded: (level < ENCODED_DEPTH).then(|| (base64, Vec::new())),
                            }
                        }
                        Kind::Leaf => State::Body { encoded: None },
                    }
                }
            }
            State::Body {
                encoded: Some((base64, mut body)),
            } => {
                body.extend_from_slice(line);
                State::Body {
                    encoded: Some((base64, body)),
                }
            }
            body @ State::Body { encoded: None } => body,
        };
        if let Some(over) = counts.over(limits) {
            return Err(over);
        }
    }
    if let State::Body {
        encoded: Some((base64, body)),
    } = state
    {
        walk_encoded(&body, base64, level, limits, counts)?;
    }
    counts.over(limits).map_or(Ok(()), Err)
}

fn walk_encoded(
    body: &[u8],
    base64: bool,
    level: usize,
    limits: &StructureLimits,
    counts: &mut Structure,
) -> Result<(), String> {
    let decoded = if base64 {
        base64_decode(body)
    } else {
        quoted_printable_decode(body)
    };
    match decoded {
        Some(inner) => walk(&inner, level + 1, limits, counts),
        None => Ok(()),
    }
}

/// Which open boundary `line` is, innermost first: (its depth, whether it closes). The
/// parser finds a boundary by its prefix, so what follows it on the line is not looked at.
fn boundary_line(line: &[u8], open: &[(Vec<u8>, bool)]) -> Option<(usize, bool)> {
    let rest = line.strip_prefix(b"--")?;
    open.iter()
        .enumerate()
        .rev()
        .find_map(|(depth, (boundary, _))| {
            let after = rest.strip_prefix(boundary.as_slice())?;
            Some((depth, after.starts_with(b"--")))
        })
}

/// The unfolded fields of a header block: (lower-case name, value).
fn fields(block: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(block);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    fields
}

/// `value` without comments and white space, lower-cased, up to its first `;`.
fn media_type(value: &str) -> String {
    let mut out = String::new();
    let mut comment = 0usize;
    for c in value.chars() {
        match c {
            '(' => comment += 1,
            ')' => comment = comment.saturating_sub(1),
            ';' if comment == 0 => break,
            c if comment == 0 && !c.is_whitespace() && c != '"' => out.push(c.to_ascii_lowercase()),
            _ => {}
        }
    }
    out
}

fn classify(block: &[u8], in_digest: bool) -> Kind {
    let fields = fields(block);
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(ctype) = field("content-type") else {
        return if in_digest { Kind::Message } else { Kind::Leaf };
    };
    let media = media_type(ctype);
    if media.starts_with("multipart/") {
        return match boundary_of(ctype) {
            Some(boundary) => Kind::Multipart {
                boundary,
                digest: media == "multipart/digest",
            },
            None => Kind::Leaf,
        };
    }
    let message =
        media.starts_with("message/") || (in_digest && (media.is_empty() || !media.contains('/')));
    if !message {
        return Kind::Leaf;
    }
    let encoding = field("content-transfer-encoding").map(media_type);
    match encoding.as_deref() {
        Some(e) if e.contains("base64") => Kind::EncodedMessage { base64: true },
        Some(e) if e.contains("quoted-printable") => Kind::EncodedMessage { base64: false },
        _ => Kind::Message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: StructureLimits = StructureLimits {
        max_mime_parts: 1000,
        max_message_parts: 64,
        max_multipart_parts: 128,
        max_encoded_message_parts: 8,
    };

    fn nested(levels: usize, header: &str) -> Vec<u8> {
        let mut raw = String::from("From: a@b.example\r\n");
        for _ in 0..levels {
            raw.push_str(header);
            raw.push_str("\r\n\r\n");
        }
        raw.push_str("Content-Type: text/plain\r\n\r\nSKU-1 x 1\r\n");
        raw.into_bytes()
    }

    fn limit_of(raw: &[u8]) -> Option<String> {
        measure(raw, &LIMITS)
            .err()
            .map(|e| e.split(':').next().unwrap_or_default().to_owned())
    }

    #[test]
    fn an_ordinary_message_is_measured() {
        let raw = b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: fwd\r\n\r\nSKU-1 x 2\r\n--b--\r\n";
        let s = measure(raw, &LIMITS).expect("within the limits");
        assert_eq!(
            s,
            Structure {
                parts: 4,
                messages: 1,
                multiparts: 1,
                encoded_messages: 0
            }
        );
    }

    #[test]
    fn every_kind_of_message_part_counts() {
        for header in [
            "Content-Type: message/rfc822",
            "Content-Type: MESSAGE/Global",
            "Content-Type: message / global (a comment)",
            "Content-Type:\r\n message/rfc822",
        ] {
            assert_eq!(
                limit_of(&nested(65, header)).as_deref(),
                Some("max_rfc822_nesting"),
                "{header}"
            );
            assert!(measure(&nested(64, header), &LIMITS).is_ok(), "{header}");
        }
    }

    #[test]
    fn digest_children_need_no_header_and_still_count() {
        let mut raw = String::new();
        for i in 0..70 {
            raw.push_str(&format!(
                "Content-Type: multipart/digest; boundary=\"d{i}\"\r\n\r\n--d{i}\r\n\r\n"
            ));
        }
        assert_eq!(
            limit_of(raw.as_bytes()).as_deref(),
            Some("max_rfc822_nesting")
        );
    }

    #[test]
    fn nesting_inside_a_transfer_encoded_message_part_counts() {
        use base64::Engine as _;
        let inner = nested(60, "Content-Type: message/rfc822");
        let encoded = base64::engine::general_purpose::STANDARD.encode(&inner);
        let raw = format!(
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n--b--\r\n"
        );
        assert_eq!(
            limit_of(raw.as_bytes()).as_deref(),
            Some("max_rfc822_nesting")
        );
        let few = format!(
            "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
            base64::engine::general_purpose::STANDARD
                .encode(nested(3, "Content-Type: message/rfc822"))
        );
        let s = measure(few.as_bytes(), &LIMITS).expect("within the limits");
        assert_eq!((s.messages, s.encoded_messages), (4, 1));
    }

    #[test]
    fn too_many_encoded_message_parts_are_refused() {
        let mut raw = String::from("Content-Type: multipart/mixed; boundary=b\r\n\r\n");
        for _ in 0..9 {
            raw.push_str("--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nSubject: x\r\n\r\nhi\r\n");
        }
        raw.push_str("--b--\r\n");
        assert_eq!(
            limit_of(raw.as_bytes()).as_deref(),
            Some("max_encoded_message_parts")
        );
    }

    #[test]
    fn deep_and_wide_multiparts_are_refused_early() {
        let mut deep = String::new();
        for i in 0..50_000 {
            deep.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=\"m{i}\"\r\n\r\n--m{i}\r\n"
            ));
        }
        assert_eq!(
            limit_of(deep.as_bytes()).as_deref(),
            Some("max_multipart_parts")
        );
        let mut wide = String::from("Content-Type: multipart/mixed; boundary=w\r\n\r\n");
        for _ in 0..1001 {
            wide.push_str("--w\r\n\r\nx\r\n");
        }
        assert_eq!(limit_of(wide.as_bytes()).as_deref(), Some("max_mime_parts"));
    }
}
