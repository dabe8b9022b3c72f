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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    "pcs",
    "pc",
    "pcs.",
    "pc.",
    "pieces",
    "piece",
    "units",
    "unit",
    "ea",
    "ea.",
    "each",
    "stk",
    "stk.",
    "stück",
    "st.",
    "st",
    "шт",
    "шт.",
    "штук",
    "штуки",
    "pz",
    "pièces",
    "pièce",
    "pce",
    "pces",
    "u.",
    "uds",
    "boxes",
    "box",
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

/// True for the line that starts quoted history in a reply (`On … wrote:`, Outlook's
/// `-----Original Message-----` or its `From:`/`Sent:` block): what follows is an earlier
/// message, and its lines are not part of this order.
fn starts_history(line: &str, next: Option<&str>) -> bool {
    let t = line.trim();
    let lower = t.to_lowercase();
    let next = next.map(|n| n.trim().to_lowercase()).unwrap_or_default();
    (t.starts_with("-----") && lower.contains("original message"))
        || (t.len() >= 10 && t.chars().all(|c| c == '_'))
        || (lower.starts_with("on ") && lower.ends_with("wrote:"))
        || (lower.starts_with("am ") && lower.ends_with("schrieb:"))
        || (lower.starts_with("le ") && lower.ends_with("a écrit :"))
        || ((lower.starts_with("from:") || lower.starts_with("von:") || lower.starts_with("de :"))
            && ["sent:", "gesendet:", "envoyé :", "date:"]
                .iter()
                .any(|p| next.starts_with(p)))
}

/// How a text body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextMode {
    /// A new message or a reply: reading stops at the signature and at quoted history.
    Message,
    /// A forwarded message (`Fwd:`): the forwarded part is what the sender passes on, so
    /// forwarding markers and signatures do not stop reading; `>` quotes are still skipped.
    Forward,
}

/// Order lines of a text body. Quoted lines (`>`), the signature (after `-- `) and quoted
/// history of a reply are skipped.
pub fn lines_from_text(text: &str) -> Extraction {
    lines_from_text_in(text, TextMode::Message).0
}

/// Like [`lines_from_text`]; also says whether reading stopped at a signature or at history
/// (so a caller reading a document in pieces knows to stop too).
pub fn lines_from_text_in(text: &str, mode: TextMode) -> (Extraction, bool) {
    let mut out = Extraction::default();
    let lines: Vec<&str> = text.lines().collect();
    for (n, raw) in lines.iter().enumerate() {
        let stop = raw.trim_end() == "--" || starts_history(raw, lines.get(n + 1).copied());
        if stop && mode == TextMode::Message {
            return (out, true);
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
    (out, false)
}

/// Limits on tables read from attachments and HTML bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsvLimits {
    /// Most data rows read from one table.
    pub max_rows: usize,
    /// Longest CSV record, in bytes.
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
    "sku code",
    "article",
    "article no",
    "article number",
    "art no",
    "art nr",
    "art.-nr",
    "art.nr",
    "item",
    "item no",
    "item code",
    "item number",
    "part",
    "part no",
    "part number",
    "product code",
    "code",
    "artikel",
    "artikelnummer",
    "artikel-nr",
    "artikelnr",
    "bestellnummer",
    "référence",
    "reference",
    "réf",
    "ref",
    "code article",
    "артикул",
    "код",
    "код товара",
];
const QTY_HEADERS: &[&str] = &[
    "qty",
    "quantity",
    "qty ordered",
    "order qty",
    "amount",
    "count",
    "units",
    "pcs",
    "menge",
    "anzahl",
    "stückzahl",
    "bestellmenge",
    "quantité",
    "quantite",
    "qté",
    "qte",
    "количество",
    "кол-во",
    "кол",
];

fn normalise_header(cell: &str) -> String {
    let lower = cell.to_lowercase();
    let trimmed = lower.trim_matches(|c: char| {
        c.is_whitespace() || matches!(c, '"' | '.' | ':' | '#' | '*' | '№')
    });
    let words: Vec<&str> = trimmed.split_whitespace().collect();
    let joined = words.join(" ");
    // "Qty (pcs)", "Menge [Stk]": the unit in brackets is not part of the name.
    match joined.find(['(', '[']) {
        Some(i) if i > 0 => joined[..i].trim_end().to_owned(),
        _ => joined,
    }
}

fn header_column(row: &[String], names: &[&str]) -> Option<usize> {
    row.iter()
        .position(|h| names.contains(&normalise_header(h).as_str()))
}

/// The rows searched for a header row before a table is taken as having none.
pub const HEADER_SEARCH_ROWS: usize = 20;

/// The header row of a table: its index and the SKU and quantity columns. Title rows above
/// it (a company name, an order number) are allowed.
pub fn find_header(rows: &[Vec<String>]) -> Option<(usize, usize, usize)> {
    rows.iter()
        .take(HEADER_SEARCH_ROWS)
        .enumerate()
        .find_map(|(i, row)| {
            let sku = header_column(row, SKU_HEADERS)?;
            let qty = header_column(row, QTY_HEADERS)?;
            (sku != qty).then_some((i, sku, qty))
        })
}

/// An article number in a table column whose header names it: digits-only numbers are
/// article numbers there (they are not in free text, where they would be quantities).
fn is_table_sku(token: &str) -> bool {
    let len_ok = (1..=40).contains(&token.chars().count());
    let chars_ok = token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    let ends_ok = token.starts_with(|c: char| c.is_ascii_alphanumeric())
        && token.ends_with(|c: char| c.is_ascii_alphanumeric());
    len_ok && chars_ok && ends_ok && token.chars().any(|c| c.is_ascii_digit())
}

/// A quantity cell: `5`, `5 pcs`, or `5.0` as spreadsheets write whole numbers.
fn table_quantity(cell: &str) -> Result<u32, String> {
    let mut tokens = cell.split_whitespace();
    let number = tokens.next().unwrap_or("");
    let rest: Vec<&str> = tokens.collect();
    if !only_unit_left(&rest) {
        return Err(format!("quantity {cell:?} is not a whole number"));
    }
    let whole = number
        .strip_suffix(".0")
        .or_else(|| number.strip_suffix(",0"))
        .unwrap_or(number);
    quantity(whole)
}

/// Order lines of a table (CSV, spreadsheet or HTML) whose header row names the SKU and
/// quantity columns. Rows are read after the header; empty rows are skipped; a row whose
/// article number or quantity is not valid is reported.
pub fn lines_from_table(rows: &[Vec<String>], origin: &str, max_rows: usize) -> Extraction {
    let mut out = Extraction::default();
    let Some((header, sku_col, qty_col)) = find_header(rows) else {
        out.invalid.push(format!(
            "{origin}: no SKU and quantity columns in a header row"
        ));
        return out;
    };
    for (i, record) in rows.iter().enumerate().skip(header + 1) {
        let row = i + 1;
        if i - header > max_rows {
            out.invalid.push(format!(
                "{origin}: more than {max_rows} rows; the rest was not read"
            ));
            break;
        }
        let sku_cell = record.get(sku_col).map_or("", |s| s.trim());
        let qty = record.get(qty_col).map_or("", |s| s.trim());
        if sku_cell.is_empty() && qty.is_empty() {
            continue;
        }
        // "SKU-1 (blue)": the article number is the cell's first word.
        let sku = sku_cell.split_whitespace().next().unwrap_or("");
        if !is_table_sku(sku) {
            // A totals row ("Total", 12) or a note under the table is not an order line.
            if sku_cell.chars().any(|c| c.is_ascii_digit()) || sku_cell.is_empty() {
                out.invalid.push(format!(
                    "{origin} row {row}: {sku_cell:?} is not an article number"
                ));
            }
            continue;
        }
        match table_quantity(qty) {
            Ok(quantity) => out.lines.push(OrderLine {
                sku: sku.to_uppercase(),
                quantity,
                origin: origin.to_owned(),
            }),
            Err(why) => out
                .invalid
                .push(format!("{origin} row {row}: {}: {why}", sku.to_uppercase())),
        }
    }
    out
}

fn detect_delimiter(text: &str) -> u8 {
    // The header is not always the first line (title rows), so look at a few lines.
    let sample: String = text.lines().take(5).collect::<Vec<_>>().join("\n");
    [b',', b';', b'\t']
        .into_iter()
        .max_by_key(|d| sample.bytes().filter(|b| b == d).count())
        .unwrap_or(b',')
}

/// Order lines of a CSV file: delimiter `,` `;` or tab detected, BOM skipped, quoted fields
/// with delimiters and newlines, a header row naming the SKU and quantity columns.
pub fn lines_from_csv(text: &str, origin: &str, limits: CsvLimits) -> Extraction {
    let text = text.trim_start_matches('\u{feff}');
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(detect_delimiter(text))
        .flexible(true)
        .has_headers(false)
        .from_reader(text.as_bytes());
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let cap = limits.max_rows.saturating_add(HEADER_SEARCH_ROWS + 1);
    for (i, record) in reader.records().enumerate() {
        if i >= cap {
            break;
        }
        match record {
            Ok(r) if r.as_slice().len() > limits.max_record_bytes => {
                problems.push(format!(
                    "{origin} row {}: longer than {} bytes",
                    i + 1,
                    limits.max_record_bytes
                ));
                rows.push(Vec::new());
            }
            Ok(r) => rows.push(r.iter().map(str::to_owned).collect()),
            Err(e) => {
                problems.push(format!("{origin} row {}: {e}", i + 1));
                rows.push(Vec::new());
            }
        }
    }
    let mut out = lines_from_table(&rows, origin, limits.max_rows);
    out.invalid.extend(problems);
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

    #[test]
    fn tables_with_title_rows_numeric_skus_and_spreadsheet_numbers() {
        let rows: Vec<Vec<String>> = [
            vec!["Purchase order 4711", ""],
            vec!["", ""],
            vec!["Art.-Nr.", "Menge (Stk)"],
            vec!["100234", "5.0"],
            vec!["SKU-2 (blue)", "3 pcs"],
            vec!["Total", "8"],
            vec!["SKU-3", "2.5"],
        ]
        .iter()
        .map(|r| r.iter().map(|c| (*c).to_owned()).collect())
        .collect();
        let got = lines_from_table(&rows, "order.xlsx", 100);
        let pairs: Vec<(&str, u32)> = got
            .lines
            .iter()
            .map(|l| (l.sku.as_str(), l.quantity))
            .collect();
        assert_eq!(pairs, [("100234", 5), ("SKU-2", 3)]);
        assert_eq!(got.invalid.len(), 1, "{:?}", got.invalid);
        assert!(got.invalid[0].contains("SKU-3"));
    }

    #[test]
    fn forwarded_text_is_read_past_the_markers() {
        let text = "FYI\n-- \nJane\n---------- Forwarded message ---------\nFrom: a@b.example\nDate: Mon\n\nSKU-1 x 2";
        assert!(lines_from_text(text).lines.is_empty());
        let (got, _) = lines_from_text_in(text, TextMode::Forward);
        assert_eq!(got.lines.len(), 1);
    }

    #[test]
    fn outlook_reply_headers_start_history() {
        check(
            "SKU-1 x 1\nFrom: Bob <b@x.example>\nSent: Monday\nSKU-9 x 9",
            &[("SKU-1", 1)],
            0,
        );
    }
}
