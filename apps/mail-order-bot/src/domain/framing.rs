//! Lenient MIME framing: multipart messages whose boundaries programs got slightly wrong,
//! mended before the parser sees them, the way a lenient reader (Python's `email`) reads
//! them.
//!
//! - A closing boundary that is missing (truncating gateways, some mailers): the last part
//!   runs to the end of the message. mail-parser would otherwise take that part as raw text
//!   without its transfer encoding, so a base64 CSV or XLSX became unreadable.
//! - An inner multipart left open when its parent's boundary comes: the parent's boundary
//!   ends it (RFC 2046 forbids a boundary inside the parts it encloses, so this is never
//!   data). mail-parser would read the parent's next parts into the inner part's last one.
//!
//! Boundary lines are matched whole, at the start of a line, with trailing white space
//! allowed (RFC 2046 transport padding); a line that merely starts like a boundary
//! (`--abc-def` for boundary `abc`) is content, and its dashes are parted by a space so
//! that the parser, which finds boundaries anywhere by prefix, reads it as content too. Well-formed
//! messages are returned as they are, without a copy.

use std::borrow::Cow;

/// `raw` with the closing boundaries it lacks added where a lenient reader puts them;
/// borrowed when nothing was missing.
pub fn close_open_parts(raw: &[u8]) -> Cow<'_, [u8]> {
    let eol: &[u8] = if raw.windows(2).any(|w| w == b"\r\n") {
        b"\r\n"
    } else {
        b"\n"
    };
    let mut open: Vec<Vec<u8>> = Vec::new();
    let mut out: Option<Vec<u8>> = None;
    // Where the copy (if any) has reached in `raw`.
    let mut copied = 0usize;
    let mut state = State::Headers(Vec::new());
    for (at, line) in lines_with_ends(raw) {
        let end = at + line.len();
        if let Some((depth, closing)) = boundary_line(line, &open) {
            let inner = open.len() - 1 - depth;
            if inner > 0 {
                let out = out.get_or_insert_with(|| Vec::with_capacity(raw.len() + 128));
                out.extend_from_slice(&raw[copied..at]);
                copied = at;
                for boundary in open.drain(depth + 1..).rev() {
                    out.extend_from_slice(b"--");
                    out.extend_from_slice(&boundary);
                    out.extend_from_slice(b"--");
                    out.extend_from_slice(eol);
                }
            }
            if closing {
                open.pop();
                state = State::Body;
            } else {
                state = State::Headers(Vec::new());
            }
        } else {
            let lookalikes = lookalikes(line, &open);
            if !lookalikes.is_empty() {
                // Content that holds a boundary without being a boundary line (`--abc-- is not
                // the end`): the parser finds boundaries anywhere, so the two dashes are
                // parted by a space (`- -abc-- is not the end`).
                let out = out.get_or_insert_with(|| Vec::with_capacity(raw.len() + 128));
                out.extend_from_slice(&raw[copied..at]);
                let mut from = 0;
                for dash in lookalikes {
                    out.extend_from_slice(&line[from..=dash]);
                    out.push(b' ');
                    from = dash + 1;
                }
                out.extend_from_slice(&line[from..]);
                copied = end;
            }
            state = match state {
                State::Headers(mut header) => {
                    if line.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                        match content_type(&header) {
                            Entity::Multipart(boundary) => {
                                open.push(boundary);
                                State::Body
                            }
                            Entity::Message => State::Headers(Vec::new()),
                            Entity::Other => State::Body,
                        }
                    } else {
                        header.extend_from_slice(line);
                        State::Headers(header)
                    }
                }
                State::Body => State::Body,
            };
        }
    }
    if open.is_empty() {
        return match out {
            None => Cow::Borrowed(raw),
            Some(mut out) => {
                out.extend_from_slice(&raw[copied..]);
                Cow::Owned(out)
            }
        };
    }
    let mut out = out.unwrap_or_else(|| Vec::with_capacity(raw.len() + 128));
    out.extend_from_slice(&raw[copied..]);
    if !out.ends_with(b"\n") {
        out.extend_from_slice(eol);
    }
    for boundary in open.iter().rev() {
        out.extend_from_slice(b"--");
        out.extend_from_slice(boundary);
        out.extend_from_slice(b"--");
        out.extend_from_slice(eol);
    }
    Cow::Owned(out)
}

/// The lines of `raw`, each with its line ending and the offset where it starts; a last
/// line without an ending is yielded as it is.
pub(crate) fn lines_with_ends(raw: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= raw.len() {
            return None;
        }
        let start = at;
        at = raw[start..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(raw.len(), |p| start + p + 1);
        Some((start, &raw[start..at]))
    })
}

enum State {
    /// Reading an entity's header block (the message's, a part's, a forwarded message's).
    Headers(Vec<u8>),
    /// In a body, a preamble or an epilogue.
    Body,
}

enum Entity {
    Multipart(Vec<u8>),
    /// `message/rfc822` (not transfer-encoded): its body starts with headers.
    Message,
    Other,
}

/// Which open boundary `line` is, innermost first: (its depth, whether it closes).
fn boundary_line(line: &[u8], open: &[Vec<u8>]) -> Option<(usize, bool)> {
    let rest = line.strip_prefix(b"--")?;
    for (depth, boundary) in open.iter().enumerate().rev() {
        let Some(after) = rest.strip_prefix(boundary.as_slice()) else {
            continue;
        };
        let (closing, after) = match after.strip_prefix(b"--") {
            Some(after) => (true, after),
            None => (false, after),
        };
        if after.iter().all(u8::is_ascii_whitespace) {
            return Some((depth, closing));
        }
    }
    None
}

/// Where `--` followed by an open boundary starts in `line` (not a boundary line).
fn lookalikes(line: &[u8], open: &[Vec<u8>]) -> Vec<usize> {
    let mut found = Vec::new();
    if open.is_empty() {
        return found;
    }
    let mut i = 0;
    while i + 1 < line.len() {
        if line[i] == b'-' && line[i + 1] == b'-' {
            let rest = &line[i + 2..];
            if open.iter().any(|b| rest.starts_with(b)) {
                found.push(i);
                i += 2;
                continue;
            }
        }
        i += 1;
    }
    found
}

/// What an entity's header block declares.
fn content_type(header: &[u8]) -> Entity {
    let text = String::from_utf8_lossy(header);
    // Unfold: a line starting with white space continues the previous one.
    let mut fields: Vec<String> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else {
            fields.push(line.to_owned());
        }
    }
    let field = |name: &str| {
        fields.iter().find_map(|f| {
            let (n, v) = f.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let Some(ctype) = field("Content-Type") else {
        return Entity::Other;
    };
    let media = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media.starts_with("multipart/") {
        // Longer boundaries than RFC 2046's 70 characters (with room) are left to the parser.
        return boundary_of(&ctype)
            .filter(|b| b.len() <= 200)
            .map_or(Entity::Other, Entity::Multipart);
    }
    let encoded = field("Content-Transfer-Encoding").is_some_and(|e| {
        let e = e.to_ascii_lowercase();
        e.contains("base64") || e.contains("quoted-printable")
    });
    if matches!(media.as_str(), "message/rfc822" | "message/global") && !encoded {
        return Entity::Message;
    }
    Entity::Other
}

/// The `boundary` parameter of a Content-Type value, quoted or not.
pub(crate) fn boundary_of(ctype: &str) -> Option<Vec<u8>> {
    for param in ctype.split(';').skip(1) {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(quoted) => quoted.split('"').next().unwrap_or(""),
            None => value.split_whitespace().next().unwrap_or(""),
        };
        if !value.is_empty() {
            return Some(value.as_bytes().to_vec());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: &str) {
        let raw = raw.replace('\n', "\r\n");
        let expected = expected.replace('\n', "\r\n");
        let got = close_open_parts(raw.as_bytes());
        assert_eq!(String::from_utf8_lossy(&got), expected);
        assert_eq!(matches!(got, Cow::Borrowed(_)), raw == expected);
    }

    const H: &str = "Content-Type: multipart/mixed;\n boundary=\"abc\"\n\n";

    #[test]
    fn well_formed_mail_is_untouched() {
        let ok = format!("{H}pre\n--abc\nContent-Type: text/plain\n\nhi\n--abc--\nepilogue\n");
        check(&ok, &ok);
        check("Subject: plain\n\n--abc\n", "Subject: plain\n\n--abc\n");
    }

    #[test]
    fn a_missing_closing_boundary_is_added_at_the_end() {
        let open = format!("{H}--abc\nContent-Type: text/csv\n\nsku,qty\nSKU-1,2\n");
        check(&open, &format!("{open}--abc--\n"));
        let no_eol = format!("{H}--abc\n\nSKU-1 x 2");
        check(&no_eol, &format!("{no_eol}\n--abc--\n"));
    }

    #[test]
    fn an_open_inner_multipart_ends_at_its_parents_boundary() {
        let raw = format!(
            "{H}--abc\nContent-Type: multipart/alternative; boundary=in\n\n--in\n\nhello\n--abc\nContent-Type: text/csv\n\nsku,qty\n--abc--\n"
        );
        let fixed = raw.replacen("hello\n--abc\n", "hello\n--in--\n--abc\n", 1);
        check(&raw, &fixed);
    }

    #[test]
    fn lookalikes_and_padding_are_not_boundaries() {
        let raw = format!("{H}--abc  \n\nx\n--abc-- \t\n");
        check(&raw, &raw);
        let open = format!("{H}--abcdef\n--abc\n\nsee --abc in a line\n--abc-- not the end\n");
        let fixed =
            format!("{H}- -abcdef\n--abc\n\nsee - -abc in a line\n- -abc-- not the end\n--abc--\n");
        check(&open, &fixed);
    }

    #[test]
    fn forwarded_messages_are_framed_too() {
        let raw = format!(
            "{H}--abc\nContent-Type: message/rfc822\n\nSubject: fwd\nContent-Type: multipart/mixed; boundary=\"inner\"\n\n--inner\n\nSKU-1 x 1\n"
        );
        check(&raw, &format!("{raw}--inner--\n--abc--\n"));
    }
}
