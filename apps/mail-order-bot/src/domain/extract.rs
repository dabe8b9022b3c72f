//! Order lines from message text and from CSV attachments.

use serde::{Deserialize, Serialize};

/// One order line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// Article number, upper-cased.
    pub sku: String,
    /// Positive quantity.
    pub quantity: u32,
    /// Where it was found: `body` or the attachment's name.
    pub origin: String,
}

/// What was extracted from one text or file: lines, and lines that looked like order lines
/// but were not valid (reported, never dropped silently).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extraction {
    /// Valid lines.
    pub lines: Vec<OrderLine>,
    /// Human-readable descriptions of invalid lines.
    pub invalid: Vec<String>,
}

impl Extraction {
    /// Appends another extraction.
    pub fn extend(&mut self, other: Extraction) {
        self.lines.extend(other.lines);
        self.invalid.extend(other.invalid);
    }
}

/// The largest quantity accepted on one line.
pub const MAX_QUANTITY: u32 = 1_000_000;

const UNITS: &[&str] = &[
    "pcs", "pc", "pcs.", "pc.", "pieces", "piece", "units", "unit", "ea", "ea.", "each", "stk",
    "stk.", "stück", "st.", "шт", "шт.", "pz", "pièces",
];

fn is_sku(token: &str) -> bool {
    let t = token;
    let len_ok = (3..=40).contains(&t.chars().count());
    let chars_ok = t
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    let starts_ok = t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ends_ok = t.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    let has_letter = t.chars().any(|c| c.is_ascii_alphabetic());
    let has_digit = t.chars().any(|c| c.is_ascii_digit());
    let is_times_qty = t.len() > 1
        && matches!(t.as_bytes()[0], b'x' | b'X')
        && t[1..].chars().all(|c| c.is_ascii_digit());
    len_ok && chars_ok && starts_ok && ends_ok && has_letter && has_digit && !is_times_qty
}

fn is_times(token: &str) -> bool {
    matches!(token, "x" | "X" | "×" | "*")
}

/// Splits `x5` / `×5` / `5x` into the number part, if the token is such a glued form.
fn glued_quantity(token: &str, prefix: bool) -> Option<&str> {
    for sign in ["x", "X", "×"] {
        let rest = if prefix {
            token.strip_prefix(sign)
        } else {
            token.strip_suffix(sign)
        };
        if let Some(rest) = rest.filter(|r| !r.is_empty()) {
            return Some(rest);
        }
    }
    None
}

fn strip_bullet(line: &str) -> &str {
    let line = line.trim();
    for bullet in ["- ", "* ", "• ", "– ", "— ", "· "] {
        if let Some(rest) = line.strip_prefix(bullet) {
            return rest.trim_start();
        }
    }
    // "1. " and "1) " numbering
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    if digits > 0 && digits < 4 {
        let rest = &line[digits..];
        if let Some(rest) = rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
            return rest.trim_start();
        }
    }
    line
}

enum Parsed {
    Line(String, u32),
    Invalid(String, String),
    NotAnOrderLine,
}

fn quantity(raw: &str) -> Result<u32, String> {
    let raw = raw.trim_end_matches([',', ';', '.']);
    match raw.parse::<i64>() {
        Ok(q) if q >= 1 && q <= i64::from(MAX_QUANTITY) => Ok(q as u32),
        Ok(q) if q < 1 => Err(format!("quantity {q} is not positive")),
        Ok(q) => Err(format!("quantity {q} is above {MAX_QUANTITY}")),
        Err(_) => Err(format!("quantity {raw:?} is not a whole number")),
    }
}

fn only_unit_left(rest: &[&str]) -> bool {
    match rest {
        [] => true,
        [unit] => UNITS.contains(&unit.to_lowercase().as_str()),
        _ => false,
    }
}

fn parse_line(line: &str) -> Parsed {
    let tokens: Vec<&str> = strip_bullet(line).split_whitespace().collect();
    let (sku, qty, rest): (&str, &str, &[&str]) = match tokens.as_slice() {
        // SKU-1234 x 5 [pcs]
        [sku, times, qty, rest @ ..] if is_sku(sku) && is_times(times) => (sku, qty, rest),
        // SKU-1234 x5 [pcs]
        [sku, glued, rest @ ..] if is_sku(sku) && glued_quantity(glued, true).is_some() => {
            (sku, glued_quantity(glued, true).unwrap_or(glued), rest)
        }
        // 5 x SKU-1234 [pcs]
        [qty, times, sku, rest @ ..]
            if is_times(times)
                && is_sku(sku)
                && qty.starts_with(|c: char| c.is_ascii_digit() || c == '-') =>
        {
            (sku, qty, rest)
        }
        // 5x SKU-1234
        [glued, sku, rest @ ..]
            if is_sku(sku)
                && glued_quantity(glued, false).is_some_and(|q| q.parse::<i64>().is_ok()) =>
        {
            (sku, glued_quantity(glued, false).unwrap_or(glued), rest)
        }
        _ => return Parsed::NotAnOrderLine,
    };
    if !only_unit_left(rest) {
        return Parsed::NotAnOrderLine;
    }
    let sku = sku.trim_end_matches(['.', ',', ':']).to_uppercase();
    match quantity(qty) {
        Ok(q) => Parsed::Line(sku, q),
        Err(why) => Parsed::Invalid(sku, why),
    }
}

/// True for the line that starts quoted or forwarded history in a reply: what follows is
/// an earlier message, and its lines are not part of this order.
fn starts_history(line: &str) -> bool {
    let t = line.trim();
    let lower = t.to_lowercase();
    (t.starts_with("-----") && lower.contains("original message"))
        || (t.len() >= 10 && t.chars().all(|c| c == '_'))
        || (lower.starts_with("on ") && lower.ends_with("wrote:"))
        || (lower.starts_with("am ") && lower.ends_with("schrieb:"))
}

/// Order lines of a text body. Quoted lines (`>`), the signature (after `-- `) and quoted
/// history of a reply are skipped.
pub fn lines_from_text(text: &str) -> Extraction {
    let mut out = Extraction::default();
    for (n, raw) in text.lines().enumerate() {
        if raw == "-- " || raw == "--" || starts_history(raw) {
            break;
        }
        if raw.trim_start().starts_with('>') {
            continue;
        }
        match parse_line(raw) {
            Parsed::Line(sku, quantity) => out.lines.push(OrderLine {
                sku,
                quantity,
                origin: "body".into(),
            }),
            Parsed::Invalid(sku, why) => out
                .invalid
                .push(format!("body line {}: {sku}: {why}", n + 1)),
            Parsed::NotAnOrderLine => {}
        }
    }
    out
}

/// Limits on CSV attachments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CsvLimits {
    /// Most data rows read.
    pub max_rows: usize,
    /// Longest record, in bytes.
    pub max_record_bytes: usize,
}

impl Default for CsvLimits {
    fn default() -> Self {
        Self {
            max_rows: 10_000,
            max_record_bytes: 64 * 1024,
        }
    }
}

const SKU_HEADERS: &[&str] = &[
    "sku",
    "article",
    "article no",
    "article number",
    "item",
    "item no",
    "part",
    "part number",
    "product code",
    "artikel",
    "artikelnummer",
    "art.-nr.",
    "référence",
    "reference",
    "réf",
    "артикул",
];
const QTY_HEADERS: &[&str] = &[
    "qty",
    "quantity",
    "amount",
    "count",
    "menge",
    "anzahl",
    "quantité",
    "quantite",
    "qté",
    "количество",
    "кол-во",
];

fn detect_delimiter(text: &str) -> u8 {
    let first = text.lines().next().unwrap_or("");
    [b',', b';', b'\t']
        .into_iter()
        .max_by_key(|d| first.bytes().filter(|b| b == d).count())
        .unwrap_or(b',')
}

fn header_index(headers: &csv::StringRecord, names: &[&str]) -> Option<usize> {
    headers
        .iter()
        .position(|h| names.contains(&h.trim().trim_matches('"').to_lowercase().as_str()))
}

/// Order lines of a CSV file with a header row naming the SKU and quantity columns.
pub fn lines_from_csv(text: &str, origin: &str, limits: CsvLimits) -> Extraction {
    let mut out = Extraction::default();
    let text = text.trim_start_matches('\u{feff}');
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(detect_delimiter(text))
        .flexible(true)
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            out.invalid
                .push(format!("{origin}: unreadable header row: {e}"));
            return out;
        }
    };
    let (Some(sku_col), Some(qty_col)) = (
        header_index(&headers, SKU_HEADERS),
        header_index(&headers, QTY_HEADERS),
    ) else {
        out.invalid.push(format!(
            "{origin}: no SKU and quantity columns in the header row"
        ));
        return out;
    };
    for (i, record) in reader.records().enumerate() {
        let row = i + 2;
        if i >= limits.max_rows {
            out.invalid.push(format!(
                "{origin}: more than {} rows; the rest was not read",
                limits.max_rows
            ));
            break;
        }
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                out.invalid.push(format!("{origin} row {row}: {e}"));
                continue;
            }
        };
        if record.as_slice().len() > limits.max_record_bytes {
            out.invalid.push(format!(
                "{origin} row {row}: longer than {} bytes",
                limits.max_record_bytes
            ));
            continue;
        }
        let sku = record.get(sku_col).unwrap_or("").trim();
        let qty = record.get(qty_col).unwrap_or("").trim();
        if sku.is_empty() && qty.is_empty() {
            continue;
        }
        if !is_sku(sku) {
            out.invalid.push(format!(
                "{origin} row {row}: {sku:?} is not an article number"
            ));
            continue;
        }
        match quantity(qty) {
            Ok(quantity) => out.lines.push(OrderLine {
                sku: sku.to_uppercase(),
                quantity,
                origin: origin.to_owned(),
            }),
            Err(why) => out
                .invalid
                .push(format!("{origin} row {row}: {sku}: {why}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, lines: &[(&str, u32)], invalid: usize) {
        let got = lines_from_text(text);
        let pairs: Vec<(&str, u32)> = got
            .lines
            .iter()
            .map(|l| (l.sku.as_str(), l.quantity))
            .collect();
        assert_eq!(pairs, lines, "lines of {text:?}");
        assert_eq!(
            got.invalid.len(),
            invalid,
            "invalid of {text:?}: {:?}",
            got.invalid
        );
    }

    #[test]
    fn line_formats() {
        check("SKU-1234 x 5", &[("SKU-1234", 5)], 0);
        check("SKU-1234 x5", &[("SKU-1234", 5)], 0);
        check("- SKU-1234 x 5", &[("SKU-1234", 5)], 0);
        check("SKU-1234 x 5 pcs", &[("SKU-1234", 5)], 0);
        check("  * sku-77 X 12 Stk", &[("SKU-77", 12)], 0);
        check("5 x SKU-1234", &[("SKU-1234", 5)], 0);
        check("5x SKU-1234", &[("SKU-1234", 5)], 0);
        check("1. AB-12 × 3", &[("AB-12", 3)], 0);
    }

    #[test]
    fn prose_is_not_an_order_line() {
        check("Please send SKU-1234 x 5 by Friday if possible", &[], 0);
        check("Hello, we need 5 things", &[], 0);
        check("Order 2024 x 3", &[], 0);
        check("x5", &[], 0);
        check("", &[], 0);
    }

    #[test]
    fn invalid_quantities_are_reported_not_dropped() {
        check(
            "SKU-1 x 0\nSKU-2 x -3\nSKU-3 x 2.5\nSKU-4 x 99999999\nSKU-5 x 1",
            &[("SKU-5", 1)],
            4,
        );
    }

    #[test]
    fn quoted_text_signature_and_history_are_skipped() {
        check("SKU-1 x 1\n> SKU-2 x 2\n-- \nSKU-3 x 3", &[("SKU-1", 1)], 0);
        check(
            "SKU-1 x 1\n\nOn Mon, 1 Jan 2024, Bob wrote:\nSKU-9 x 9",
            &[("SKU-1", 1)],
            0,
        );
        check(
            "SKU-1 x 1\n-----Original Message-----\nSKU-9 x 9",
            &[("SKU-1", 1)],
            0,
        );
    }

    #[test]
    fn csv_with_any_delimiter_bom_and_quotes() {
        let cases = [
            "sku,qty\nSKU-1,2\nSKU-2,3\n",
            "\u{feff}Artikel;Menge\r\nSKU-1;2\r\nSKU-2;3\r\n",
            "\"SKU\"\t\"Quantity\"\nSKU-1\t2\nSKU-2\t3\n",
            "description,sku,qty\n\"Bolts, M6\nzinc\",SKU-1,2\nNuts,SKU-2,3\n",
        ];
        for text in cases {
            let got = lines_from_csv(text, "order.csv", CsvLimits::default());
            let pairs: Vec<(&str, u32)> = got
                .lines
                .iter()
                .map(|l| (l.sku.as_str(), l.quantity))
                .collect();
            assert_eq!(pairs, [("SKU-1", 2), ("SKU-2", 3)], "{text:?}");
            assert!(got.invalid.is_empty(), "{:?}", got.invalid);
        }
    }

    #[test]
    fn csv_problems_are_reported() {
        let got = lines_from_csv("name,price\na,1\n", "x.csv", CsvLimits::default());
        assert!(got.lines.is_empty());
        assert_eq!(got.invalid.len(), 1);
        let got = lines_from_csv("sku,qty\nSKU-1,zero\n,\n", "x.csv", CsvLimits::default());
        assert_eq!(got.invalid.len(), 1);
        let many = format!("sku,qty\n{}", "SKU-1,1\n".repeat(20));
        let got = lines_from_csv(
            &many,
            "x.csv",
            CsvLimits {
                max_rows: 5,
                max_record_bytes: 100,
            },
        );
        assert_eq!(got.lines.len(), 5);
        assert_eq!(got.invalid.len(), 1);
    }
}
