//! Order lines of an HTML body: order tables (a header row naming the SKU and quantity
//! columns), `<ul>`/`<ol>` lists and text lines. Only text nodes are data: tags, attributes,
//! scripts, styles and comments never are. Quoted history (`<blockquote>`, Gmail's
//! `gmail_quote`) is skipped, as in text bodies.

use ego_tree::NodeRef;
use scraper::{ElementRef, Html, Node};

use super::extract::{find_header, lines_from_table, lines_from_text_in, Extraction, TextMode};

/// Elements whose content is never shown as text.
const HIDDEN: &[&str] = &[
    "script", "style", "head", "title", "template", "noscript", "svg", "object", "iframe",
];

/// Elements that break lines.
const BLOCKS: &[&str] = &[
    "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table", "pre",
    "section", "article", "header", "footer", "hr", "dt", "dd", "address", "center",
];

/// Deepest element nesting followed; deeper content is ignored (html5ever itself keeps the
/// tree, but the walk here is recursive).
const MAX_DEPTH: usize = 256;

struct Walk<'m> {
    mode: TextMode,
    max_rows: usize,
    text: String,
    out: Extraction,
    stopped: bool,
    tables: usize,
    origin: &'m str,
}

impl Walk<'_> {
    /// Reads the text gathered so far; stops the walk at a signature or quoted history.
    fn flush(&mut self) {
        if self.stopped || self.text.trim().is_empty() {
            self.text.clear();
            return;
        }
        let (got, stopped) = lines_from_text_in(&self.text, self.mode);
        self.out.extend(got);
        self.stopped = stopped;
        self.text.clear();
    }

    fn node(&mut self, node: NodeRef<'_, Node>, depth: usize) {
        if self.stopped || depth > MAX_DEPTH {
            return;
        }
        match node.value() {
            // HTML collapses white space, so a line break in the source is a space.
            Node::Text(text) => self.text.push_str(&text.replace(['\r', '\n'], " ")),
            Node::Element(element) => {
                let name = element.name();
                if HIDDEN.contains(&name) {
                    return;
                }
                let quoted = name == "blockquote"
                    || element
                        .classes()
                        .any(|c| c == "gmail_quote" || c == "moz-cite-prefix");
                if quoted && self.mode == TextMode::Message {
                    self.text.push('\n');
                    self.flush();
                    self.stopped = true;
                    return;
                }
                if name == "br" {
                    self.text.push('\n');
                    return;
                }
                if name == "table" {
                    if let Some(table) = ElementRef::wrap(node) {
                        let rows = table_rows(table);
                        if find_header(&rows).is_some() {
                            self.text.push('\n');
                            self.flush();
                            if self.stopped {
                                return;
                            }
                            self.tables += 1;
                            let origin = format!("{} table {}", self.origin, self.tables);
                            self.out
                                .extend(lines_from_table(&rows, &origin, self.max_rows));
                            return;
                        }
                    }
                }
                let block = BLOCKS.contains(&name);
                if block {
                    self.text.push('\n');
                }
                for child in node.children() {
                    self.node(child, depth + 1);
                }
                if block {
                    self.text.push('\n');
                } else if matches!(name, "td" | "th") {
                    self.text.push(' ');
                }
            }
            _ => {
                for child in node.children() {
                    self.node(child, depth + 1);
                }
            }
        }
    }
}

/// The rows of `table` (not of tables nested in it), each a list of cell texts with white
/// space collapsed.
fn table_rows(table: ElementRef<'_>) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    collect_rows(*table, &mut rows, 0);
    rows
}

fn collect_rows(node: NodeRef<'_, Node>, rows: &mut Vec<Vec<String>>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    for child in node.children() {
        let Some(element) = child.value().as_element() else {
            continue;
        };
        match element.name() {
            "tr" => {
                let cells = child
                    .children()
                    .filter(|c| {
                        c.value()
                            .as_element()
                            .is_some_and(|e| matches!(e.name(), "td" | "th"))
                    })
                    .map(|c| {
                        let mut text = String::new();
                        cell_text(c, &mut text, depth + 1);
                        text.split_whitespace().collect::<Vec<_>>().join(" ")
                    })
                    .collect();
                rows.push(cells);
            }
            "table" => {}
            _ => collect_rows(child, rows, depth + 1),
        }
    }
}

fn cell_text(node: NodeRef<'_, Node>, out: &mut String, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    for child in node.children() {
        match child.value() {
            Node::Text(t) => out.push_str(t),
            Node::Element(e) if HIDDEN.contains(&e.name()) => {}
            Node::Element(e) if e.name() == "br" => out.push(' '),
            _ => {
                cell_text(child, out, depth + 1);
                out.push(' ');
            }
        }
    }
}

/// Elements that never have content, so never nest.
const VOID: &[&[u8]] = &[
    b"br", b"img", b"hr", b"meta", b"link", b"input", b"col", b"area", b"base", b"wbr", b"source",
    b"track", b"embed", b"param", b"o:p",
];

/// How deeply the tags of `html` nest, estimated in one pass over the bytes: open tags
/// count up, close tags down, void and self-closed elements not at all.
pub fn nesting_depth(html: &str) -> usize {
    let bytes = html.as_bytes();
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut i = 0;
    while let Some(offset) = bytes[i..].iter().position(|&b| b == b'<') {
        i += offset + 1;
        let Some(&next) = bytes.get(i) else { break };
        if next == b'/' {
            depth = depth.saturating_sub(1);
            continue;
        }
        if !next.is_ascii_alphabetic() {
            continue;
        }
        let name_len = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b':')
            .count();
        let name = bytes[i..i + name_len].to_ascii_lowercase();
        let end = bytes[i..].iter().position(|&b| b == b'>').map(|p| i + p);
        let self_closed = end.is_some_and(|e| e > 0 && bytes[e - 1] == b'/');
        if !self_closed && !VOID.contains(&name.as_slice()) {
            depth += 1;
            deepest = deepest.max(depth);
        }
    }
    deepest
}

/// Order lines of an HTML document. `origin` names the part (`body`).
///
/// html5ever's tree building is quadratic in the nesting depth (50,000 nested `<div>`s,
/// 250 KB, take 6 s in a release build), so a document nested deeper than real mail ever is
/// is read as text (mail-parser's linear HTML-to-text conversion) instead of as a tree.
pub fn lines_from_html(html: &str, origin: &str, mode: TextMode, max_rows: usize) -> Extraction {
    if nesting_depth(html) > MAX_DEPTH {
        let text = mail_parser::decoders::html::html_to_text(html);
        return lines_from_text_in(&text, mode).0;
    }
    let document = Html::parse_document(html);
    let mut walk = Walk {
        mode,
        max_rows,
        text: String::new(),
        out: Extraction::default(),
        stopped: false,
        tables: 0,
        origin,
    };
    walk.node(*document.root_element(), 0);
    walk.flush();
    walk.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(html: &str) -> Vec<(String, u32)> {
        lines_from_html(html, "body", TextMode::Message, 100)
            .lines
            .into_iter()
            .map(|l| (l.sku, l.quantity))
            .collect()
    }

    #[test]
    fn outlook_table_with_styled_cells() {
        let html = r#"<html><head><style>td {color: red} /* SKU-9 x 9 */</style></head>
<body><p class=MsoNormal>Hello,<o:p></o:p></p>
<table class=MsoNormalTable border=1><tr><td><p class=MsoNormal><b>Article</b></p></td>
<td><p><b>Description</b></p></td><td><p><b>Qty</b></p></td></tr>
<tr><td><p class=MsoNormal>SKU-1001<o:p></o:p></p></td><td>Bolts&nbsp;M6</td><td><p>4</p></td></tr>
<tr><td>SKU-1002</td><td>Nuts</td><td>10</td></tr></table>
<p>Regards</p></body></html>"#;
        assert_eq!(
            pairs(html),
            [("SKU-1001".to_owned(), 4), ("SKU-1002".to_owned(), 10)]
        );
    }

    #[test]
    fn lists_and_text_lines() {
        let html = "<div>Please send:<ul><li>SKU-1 x 2</li><li>SKU-2 ×\n 3 pcs</li></ul>\
                    <div>SKU-3 x 1<br>5 x SKU-4</div></div>";
        let got: Vec<_> = pairs(html)
            .into_iter()
            .map(|(s, q)| format!("{s}:{q}"))
            .collect();
        assert_eq!(got, ["SKU-1:2", "SKU-2:3", "SKU-3:1", "SKU-4:5"]);
    }

    #[test]
    fn markup_is_never_data() {
        let html = r#"<p title="SKU-7 x 7">hi</p><!-- SKU-8 x 8 --><script>var a = "SKU-9 x 9";</script>
<img alt="SKU-6 x 6"><p>SKU-1 x 1</p>"#;
        assert_eq!(pairs(html), [("SKU-1".to_owned(), 1)]);
    }

    #[test]
    fn quoted_history_is_skipped() {
        let html = r#"<div>SKU-1 x 1</div><div class="gmail_quote">On Mon, Bob wrote:<blockquote>SKU-2 x 2</blockquote></div>"#;
        assert_eq!(pairs(html), [("SKU-1".to_owned(), 1)]);
    }

    #[test]
    fn deeply_nested_html_is_read_as_text() {
        assert_eq!(
            nesting_depth("<div><p>a<br>b<img src=x/></p><hr></div><div></div>"),
            2
        );
        let deep = format!("{}SKU-1 x 1", "<div>".repeat(50_000));
        assert!(nesting_depth(&deep) > MAX_DEPTH);
        assert_eq!(pairs(&deep), [("SKU-1".to_owned(), 1)]);
    }

    #[test]
    fn layout_tables_around_an_order_table() {
        let html = "<table><tr><td>Logo</td></tr><tr><td>\
                    <table><tr><th>SKU</th><th>Quantity</th></tr><tr><td>AB-1</td><td>3</td></tr></table>\
                    </td></tr></table>";
        assert_eq!(pairs(html), [("AB-1".to_owned(), 3)]);
    }
}
