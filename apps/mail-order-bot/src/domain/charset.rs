//! Turning the bytes of a text part or a text attachment into text.
//!
//! The order: the charset the part declares (when it is one we know), else UTF-8 when the
//! bytes are valid UTF-8, else a guess between Windows-1251 and ISO-8859-1 (what Russian
//! and Western European mail programs send without saying so).

use std::borrow::Cow;

use encoding_rs::{Encoding, UTF_8, WINDOWS_1251, WINDOWS_1252};

/// Decodes `bytes` as text. `declared` is the part's `charset` parameter, if any.
pub fn decode<'a>(bytes: &'a [u8], declared: Option<&str>) -> Cow<'a, str> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    if let Some(encoding) = declared.and_then(|label| Encoding::for_label(label.trim().as_bytes()))
    {
        // A declared UTF-8 that is not valid UTF-8 is a lie often enough to check.
        if encoding != UTF_8 || std::str::from_utf8(bytes).is_ok() {
            return encoding.decode_without_bom_handling(bytes).0;
        }
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Cow::Borrowed(text);
    }
    guess_single_byte(bytes)
        .decode_without_bom_handling(bytes)
        .0
}

/// Windows-1251 when most letters with the high bit set stand in runs (Cyrillic words),
/// else ISO-8859-1 (decoded as its superset Windows-1252, as browsers do): Western text has
/// an accented letter here and there among ASCII letters.
fn guess_single_byte(bytes: &[u8]) -> &'static Encoding {
    let mut high = 0usize;
    let mut high_in_runs = 0usize;
    let mut previous_high = false;
    for &b in bytes {
        let is_high = b >= 0xC0;
        if is_high {
            high += 1;
            if previous_high {
                high_in_runs += 1;
            }
        }
        previous_high = is_high;
    }
    if high > 0 && high_in_runs * 2 >= high {
        WINDOWS_1251
    } else {
        WINDOWS_1252
    }
}

/// True when text decoded by someone else lost characters (U+FFFD), so that decoding the
/// bytes again here may do better.
pub fn lost_characters(text: &str) -> bool {
    text.contains('\u{fffd}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_charsets_win() {
        assert_eq!(
            decode(b"\xf0\xd2\xc9\xd7\xc5\xd4", Some("koi8-r")),
            "Привет"
        );
        assert_eq!(
            decode(b"\xcf\xf0\xe8\xe2\xe5\xf2", Some("windows-1251")),
            "Привет"
        );
        assert_eq!(decode(b"\xa4", Some("iso-8859-15")), "€");
        assert_eq!(decode(b"caf\xe9", Some("ISO-8859-1")), "café");
    }

    #[test]
    fn undeclared_bytes_are_guessed() {
        assert_eq!(decode("Grüße".as_bytes(), None), "Grüße");
        assert_eq!(decode(b"\xef\xbb\xbfsku", None), "sku");
        assert_eq!(decode(b"\xc0\xf0\xf2\xe8\xea\xf3\xeb", None), "Артикул");
        assert_eq!(decode(b"R\xe9f\xe9rence", None), "Référence");
        // A lying UTF-8 declaration falls back to the guess.
        assert_eq!(decode(b"Menge f\xfcr", Some("utf-8")), "Menge für");
        // An unknown label is ignored.
        assert_eq!(decode(b"qty", Some("x-no-such-charset")), "qty");
    }
}
