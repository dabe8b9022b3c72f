//! Reading one raw email into the facts the bot needs.

use std::borrow::Cow;

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders, PartType};
use sha2::{Digest, Sha256};

use super::charset;
use super::extract::{lines_from_csv, lines_from_text_in, CsvLimits, Extraction, TextMode};
use super::html::lines_from_html;
use super::sheets::{lines_from_sheet, SheetFormat, SheetLimits};
use super::structure::StructureLimits;

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The identity of a raw message: its Message-ID, else a hash of its bytes.
pub fn identity_of(raw: &[u8]) -> String {
    let message_id = std::panic::catch_unwind(|| {
        MessageParser::default()
            .parse_headers(raw)
            .as_ref()
            .and_then(|m| usable_message_id(m.message_id()))
    });
    message_id
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("sha256:{}", sha256_hex(raw)))
}

pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
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

/// Every limit applied to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MailLimits {
    /// Largest message read, in bytes; larger ones are `rejected` unparsed.
    pub max_message_bytes: usize,
    /// Most message parts of any kind; beyond, the message is `rejected` unparsed.
    pub max_rfc822_nesting: usize,
    /// Most `multipart/*` parts; beyond, the message is `rejected` unparsed.
    pub max_multipart_parts: usize,
    /// Most MIME entities; beyond, the message is `rejected` unparsed.
    pub max_mime_parts: usize,
    /// Most transfer-encoded message parts; beyond, the message is `rejected` unparsed.
    pub max_encoded_message_parts: usize,
    /// CSV limits.
    pub csv: CsvLimits,
    /// Spreadsheet limits.
    pub sheets: SheetLimits,
}

impl MailLimits {
    /// The limits on the MIME structure.
    pub fn structure(&self) -> StructureLimits {
        StructureLimits {
            max_mime_parts: self.max_mime_parts,
            max_message_parts: self.max_rfc822_nesting,
            max_multipart_parts: self.max_multipart_parts,
            max_encoded_message_parts: self.max_encoded_message_parts,
        }
    }
}

impl Default for MailLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 25 * 1024 * 1024,
            max_rfc822_nesting: 64,
            max_multipart_parts: 128,
            max_mime_parts: 1000,
            max_encoded_message_parts: 8,
            csv: CsvLimits::default(),
            sheets: SheetLimits::default(),
        }
    }
}

/// Where order lines were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    /// The message text (plain or HTML), forwarded messages included.
    Body,
    /// A CSV attachment.
    Csv,
    /// An XLSX attachment.
    Xlsx,
    /// An XLS attachment.
    Xls,
    /// An ODS attachment.
    Ods,
}

/// The lines found in one part.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartLines {
    /// What kind of part.
    pub kind: PartKind,
    /// What was found there.
    pub extraction: Extraction,
}

/// How the message was classified before any client or line was looked at.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MailFacts {
    /// `mid:<Message-ID>`, or `sha256:<hex of the raw bytes>` when there is none.
    pub identity: String,
    /// SHA-256 of the raw bytes, hex.
    pub content_sha256: String,
    /// SHA-256 of what the message says (sender, subject, decoded texts and attachments),
    /// hex: the same for two deliveries of one message whatever relays added to its header
    /// or however they re-encoded it; different when the content differs.
    pub fingerprint: String,
    /// The bare From address, lower-cased; never the display name.
    pub sender: Option<String>,
    /// The decoded subject.
    pub subject: Option<String>,
    /// Lines found, per part.
    pub parts: Vec<PartLines>,
    /// Why this is an automatic message (bounce, DSN, out-of-office), if it is one.
    pub auto_reply: Option<String>,
    /// Content the bot cannot read (encrypted, TNEF), if any.
    pub unsupported: Option<String>,
    /// The limit hit, if one was: the message is `rejected`.
    pub rejected: Option<String>,
    /// Its `Message-ID` as sent (with angle brackets), for a reply's threading.
    pub message_id: Option<String>,
    /// The last few of its `References`, for a reply's threading.
    pub references: Vec<String>,
    /// Why it must never be answered, if so: a mailing list, bulk or automatic mail, the
    /// null sender, a no-reply address (RFC 3834 §2).
    pub no_reply: Option<String>,
    /// Its `Authentication-Results` header values, top first, unfolded (at most
    /// [`sender_auth::MAX_HEADERS`](super::sender_auth::MAX_HEADERS)).
    pub auth_results: Vec<String>,
    /// The bot's own DKIM and DMARC verdict (`sender_auth.mode = "verify"`), handed in by
    /// the handler; `None` when it did not verify.
    pub verified: Option<super::sender_auth::Verdict>,
}

impl MailFacts {
    fn empty(raw: &[u8], identity: String) -> Self {
        let content_sha256 = sha256_hex(raw);
        Self {
            identity,
            fingerprint: content_sha256.clone(),
            content_sha256,
            sender: None,
            subject: None,
            parts: Vec::new(),
            auto_reply: None,
            unsupported: None,
            rejected: None,
            message_id: None,
            references: Vec::new(),
            no_reply: Some("the message could not be parsed".into()),
            auth_results: Vec::new(),
            verified: None,
        }
    }

    /// A message `rejected` for `reason` without being read (its reading was stopped, or
    /// ended the process that read it): named by its Message-ID or its bytes' hash.
    pub fn rejected_unread(raw: &[u8], reason: String) -> Self {
        let mut facts = Self::empty(raw, identity_of(raw));
        facts.rejected = Some(reason);
        facts
    }

    /// The lines of the parts `wanted` accepts, in message order.
    pub fn extraction(&self, wanted: impl Fn(PartKind) -> bool) -> Extraction {
        let mut out = Extraction::default();
        for part in self.parts.iter().filter(|p| wanted(p.kind)) {
            out.extend(part.extraction.clone());
        }
        out
    }
}

fn attachment_kind(part: &MessagePart<'_>) -> Option<Result<PartKind, String>> {
    let (ctype, sub) = part
        .content_type()
        .map_or((String::new(), String::new()), |ct| {
            (
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or("").to_ascii_lowercase(),
            )
        });
    let name = part.attachment_name().unwrap_or("").to_lowercase();
    let ext = name.rsplit_once('.').map_or("", |(_, e)| e);
    let unsupported = |what: &str| Some(Err(what.to_owned()));
    match (ctype.as_str(), sub.as_str(), ext) {
        (_, "ms-tnef" | "vnd.ms-tnef", _) | (_, _, "dat")
            if name == "winmail.dat" || sub.contains("tnef") =>
        {
            unsupported("TNEF (winmail.dat) from Outlook")
        }
        ("application", "pkcs7-mime" | "x-pkcs7-mime", _) | (_, _, "p7m") => {
            unsupported("S/MIME encrypted or opaque-signed content")
        }
        ("application", "pgp-encrypted", _) | (_, _, "pgp" | "gpg" | "asc")
            if sub != "pgp-signature" =>
        {
            unsupported("PGP encrypted content")
        }
        (_, "csv" | "comma-separated-values", _) | (_, _, "csv") => Some(Ok(PartKind::Csv)),
        (_, _, "xlsx" | "xlsm")
        | (_, "vnd.openxmlformats-officedocument.spreadsheetml.sheet", _) => {
            Some(Ok(PartKind::Xlsx))
        }
        (_, _, "xls") | (_, "vnd.ms-excel", _) => Some(Ok(PartKind::Xls)),
        (_, _, "ods") | (_, "vnd.oasis.opendocument.spreadsheet", _) => Some(Ok(PartKind::Ods)),
        _ => None,
    }
}

/// The bytes of a part after its transfer encoding, before any charset: re-read from the
/// raw message when mail-parser's own decoding lost characters.
fn part_bytes<'m>(message: &'m Message<'m>, part: &'m MessagePart<'m>) -> Cow<'m, [u8]> {
    let raw = message
        .raw_message
        .get(part.offset_body as usize..part.offset_end as usize);
    match (raw, part.encoding) {
        (Some(raw), mail_parser::Encoding::Base64) => {
            base64_decode(raw).map_or(Cow::Borrowed(part.contents()), Cow::Owned)
        }
        (Some(raw), mail_parser::Encoding::QuotedPrintable) => {
            quoted_printable_decode(raw).map_or(Cow::Borrowed(part.contents()), Cow::Owned)
        }
        (Some(raw), mail_parser::Encoding::None) => Cow::Borrowed(raw),
        (None, _) => Cow::Borrowed(part.contents()),
    }
}

fn declared_charset<'m>(part: &'m MessagePart<'m>) -> Option<&'m str> {
    part.content_type().and_then(|ct| ct.attribute("charset"))
}

/// The text of a text part, charset fallbacks applied.
fn part_text<'m>(message: &'m Message<'m>, part: &'m MessagePart<'m>) -> Cow<'m, str> {
    match &part.body {
        PartType::Text(t) | PartType::Html(t) if !charset::lost_characters(t) => {
            Cow::Borrowed(t.as_ref())
        }
        _ => Cow::Owned(
            charset::decode(&part_bytes(message, part), declared_charset(part)).into_owned(),
        ),
    }
}

const AUTO_SUBJECTS: &[&str] = &[
    "automatic reply",
    "auto:",
    "autoreply",
    "auto-reply",
    "out of office",
    "out of the office",
    "abwesenheitsnotiz",
    "automatische antwort",
    "réponse automatique",
    "absence",
    "автоответ",
    "автоматический ответ",
    "undeliverable",
    "undelivered mail",
    "delivery status notification",
    "mail delivery failed",
    "delivery failure",
    "returned mail",
    "failure notice",
];

/// Why `message` is an automatic message, if it is one (RFC 3834 `Auto-Submitted`, DSN
/// reports, bounces from the null sender or a mailer daemon, out-of-office replies).
fn auto_reply(message: &Message<'_>, sender: Option<&str>) -> Option<String> {
    let header = |name: &str| message.header_raw(name).map(|v| v.trim().to_lowercase());
    if let Some(v) = header("Auto-Submitted").filter(|v| !v.starts_with("no")) {
        return Some(format!("Auto-Submitted: {v}"));
    }
    if let Some(ct) = message.content_type() {
        if ct.ctype().eq_ignore_ascii_case("multipart")
            && ct
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report"))
        {
            let kind = ct.attribute("report-type").unwrap_or("report");
            return Some(format!("multipart/report ({kind})"));
        }
    }
    for name in ["X-Autoreply", "X-Autorespond", "X-Auto-Reply"] {
        if header(name).is_some() {
            return Some(format!("{name} header"));
        }
    }
    if header("Precedence").is_some_and(|p| p == "auto_reply") {
        return Some("Precedence: auto_reply".into());
    }
    if header("Return-Path").is_some_and(|r| r == "<>") {
        return Some("sent from the null sender (Return-Path: <>)".into());
    }
    if let Some(local) = sender.and_then(|s| s.split('@').next()) {
        if matches!(local, "mailer-daemon" | "postmaster") {
            return Some(format!("sent by {local}"));
        }
    }
    let subject = message.subject().unwrap_or("").trim().to_lowercase();
    AUTO_SUBJECTS
        .iter()
        .find(|p| subject.starts_with(*p))
        .map(|p| format!("subject starts with {p:?}"))
}

/// Most `References` a reply carries on (RFC 5322 §3.6.4 lets a long thread be trimmed).
const REFERENCES_KEPT: usize = 10;

/// The message ids in a `References` or `In-Reply-To` value: each `<…>` token that is
/// printable ASCII without spaces, the last [`REFERENCES_KEPT`] of them.
fn message_ids(value: &str) -> Vec<String> {
    let mut ids: Vec<String> = value
        .split('<')
        .skip(1)
        .filter_map(|rest| rest.split_once('>').map(|(id, _)| id))
        .filter(|id| !id.is_empty() && id.len() <= 250 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(|id| format!("<{id}>"))
        .collect();
    let skip = ids.len().saturating_sub(REFERENCES_KEPT);
    ids.drain(..skip);
    ids
}

/// No-reply mailboxes by their local part.
const NO_REPLY_LOCAL_PARTS: &[&str] = &[
    "noreply",
    "no-reply",
    "no_reply",
    "donotreply",
    "do-not-reply",
    "do_not_reply",
    "bounce",
    "bounces",
    "mailer-daemon",
    "postmaster",
];

/// Why `message` must never be answered, if so (RFC 3834 §2): automatic mail, mailing
/// lists, bulk mail, the null sender, a no-reply address, or a sender asking for no
/// automatic answers.
fn no_reply(message: &Message<'_>, sender: Option<&str>, auto: Option<&String>) -> Option<String> {
    if let Some(why) = auto {
        return Some(why.clone());
    }
    let header = |name: &str| message.header_raw(name).map(|v| v.trim().to_lowercase());
    for name in [
        "List-Id",
        "List-Unsubscribe",
        "List-Post",
        "Mailing-List",
        "X-Mailing-List",
    ] {
        if header(name).is_some() {
            return Some(format!("mailing-list mail ({name})"));
        }
    }
    if let Some(p) = header("Precedence").filter(|p| matches!(p.as_str(), "bulk" | "list" | "junk"))
    {
        return Some(format!("Precedence: {p}"));
    }
    if let Some(v) = header("X-Auto-Response-Suppress").filter(|v| {
        v.split(',')
            .any(|t| matches!(t.trim(), "all" | "autoreply" | "oof"))
    }) {
        return Some(format!("X-Auto-Response-Suppress: {v}"));
    }
    let Some(sender) = sender else {
        return Some("no From address".into());
    };
    let local = sender.split('@').next().unwrap_or_default();
    if NO_REPLY_LOCAL_PARTS.contains(&local) {
        return Some(format!("a no-reply address ({sender})"));
    }
    None
}

fn is_forward(subject: Option<&str>) -> bool {
    let s = subject.unwrap_or("").trim_start().to_lowercase();
    [
        "fwd:",
        "fw:",
        "wg:",
        "tr:",
        "fwd :",
        "tr :",
        "пересл:",
        "fw :",
    ]
    .iter()
    .any(|p| s.starts_with(p))
}

/// Reads one message (or a forwarded one inside it) into `facts`.
struct Reader<'l> {
    limits: &'l MailLimits,
    hasher: Sha256,
    parts: Vec<PartLines>,
    unsupported: Option<String>,
    rejected: Option<String>,
    unnamed: usize,
}

impl Reader<'_> {
    fn hash_text(&mut self, text: &str) {
        for word in text.split_whitespace() {
            self.hasher.update(word.as_bytes());
            self.hasher.update(b" ");
        }
        self.hasher.update(b"\n");
    }

    fn body(&mut self, message: &Message<'_>, mode: TextMode) {
        let mut text = Extraction::default();
        for part in message.text_bodies() {
            if part.is_text_html() || !part.is_text() {
                continue;
            }
            let body = part_text(message, part);
            self.hash_text(&body);
            if body.contains("-----BEGIN PGP MESSAGE-----") {
                self.unsupported = Some("inline PGP encrypted text".into());
            }
            text.extend(lines_from_text_in(&body, mode).0);
        }
        let mut chosen = text;
        if chosen.lines.is_empty() {
            let mut html = Extraction::default();
            for part in message.html_bodies() {
                if !part.is_text_html() {
                    continue;
                }
                let body = part_text(message, part);
                self.hash_text(&body);
                html.extend(lines_from_html(
                    &body,
                    "body",
                    mode,
                    self.limits.csv.max_rows,
                ));
            }
            if !html.lines.is_empty() || chosen.invalid.is_empty() {
                chosen = html;
            }
        }
        self.parts.push(PartLines {
            kind: PartKind::Body,
            extraction: chosen,
        });
    }

    fn message(&mut self, message: &Message<'_>, mode: TextMode) {
        if let Some(ct) = message.content_type() {
            let full = format!(
                "{}/{}",
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or("").to_ascii_lowercase()
            );
            match full.as_str() {
                "multipart/encrypted" => {
                    self.unsupported = Some("PGP/MIME encrypted message".into());
                }
                "application/pkcs7-mime" | "application/x-pkcs7-mime" => {
                    self.unsupported = Some("S/MIME encrypted or opaque-signed message".into());
                }
                _ => {}
            }
        }
        self.body(message, mode);
        for part in message.attachments() {
            if let Some(nested) = part.message() {
                // A forwarded message is read like a body of this one.
                self.message(nested, TextMode::Forward);
                continue;
            }
            let Some(kind) = attachment_kind(part) else {
                continue;
            };
            let kind = match kind {
                Ok(kind) => kind,
                Err(what) => {
                    self.unsupported = Some(what);
                    continue;
                }
            };
            self.unnamed += 1;
            let name = part.attachment_name().map_or_else(
                || format!("attachment-{}", self.unnamed),
                |n| n.chars().filter(|c| !c.is_control()).take(200).collect(),
            );
            let bytes = part_bytes(message, part);
            self.hasher.update(name.as_bytes());
            self.hasher.update(&bytes);
            let extraction = match kind {
                PartKind::Csv => {
                    let text = charset::decode(&bytes, declared_charset(part));
                    lines_from_csv(&text, &name, self.limits.csv)
                }
                PartKind::Xlsx | PartKind::Xls | PartKind::Ods => {
                    let format = match kind {
                        PartKind::Xlsx => SheetFormat::Xlsx,
                        PartKind::Xls => SheetFormat::Xls,
                        _ => SheetFormat::Ods,
                    };
                    match lines_from_sheet(&bytes, format, &name, self.limits.sheets) {
                        Ok(extraction) => extraction,
                        Err(hit) => {
                            self.rejected.get_or_insert(hit.to_string());
                            continue;
                        }
                    }
                }
                PartKind::Body => continue,
            };
            self.parts.push(PartLines { kind, extraction });
        }
    }
}

/// The limit `raw` hits before any parser may see it, named as in the configuration.
fn limit_before_parsing(raw: &[u8], limits: &MailLimits) -> Option<String> {
    if raw.len() > limits.max_message_bytes {
        return Some(format!(
            "max_message_bytes: the message has {} bytes, above the limit of {}",
            raw.len(),
            limits.max_message_bytes
        ));
    }
    super::structure::measure(raw, &limits.structure()).err()
}

/// The top-level `Authentication-Results` values, top first, unfolded and bounded.
fn authentication_results(message: &Message<'_>) -> Vec<String> {
    use super::sender_auth::{MAX_HEADERS, MAX_HEADER_BYTES};
    message
        .headers()
        .iter()
        .filter(|h| {
            h.name
                .as_str()
                .eq_ignore_ascii_case("Authentication-Results")
        })
        .take(MAX_HEADERS)
        .filter_map(|h| {
            let raw = message
                .raw_message
                .get(h.offset_start as usize..h.offset_end as usize)?;
            let raw = &raw[..raw.len().min(MAX_HEADER_BYTES)];
            let text = String::from_utf8_lossy(raw);
            Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .collect()
}

/// How deep `message`'s nested messages go and how many parts it holds in all, walked
/// without recursion.
fn shape(message: &Message<'_>) -> (usize, usize) {
    let mut deepest = 0;
    let mut parts = 0;
    let mut pending = vec![(message, 0usize)];
    while let Some((m, depth)) = pending.pop() {
        deepest = deepest.max(depth);
        parts += m.parts.len();
        for part in &m.parts {
            if let PartType::Message(inner) = &part.body {
                pending.push((inner, depth + 1));
            }
        }
    }
    (deepest, parts)
}

/// Drops `message` one nested message at a time: the parser's own drop recurses once per
/// level and would overflow a worker's stack on deep nesting, aborting the process.
fn dismantle(message: Message<'_>) {
    let mut pending = vec![message];
    while let Some(mut m) = pending.pop() {
        for part in &mut m.parts {
            if matches!(part.body, PartType::Message(_)) {
                if let PartType::Message(inner) =
                    std::mem::replace(&mut part.body, PartType::Text(Cow::Borrowed("")))
                {
                    pending.push(inner);
                }
            }
        }
    }
}

/// Parses `raw` and extracts its order lines, applying `limits` first. Never panics on bad
/// input: what cannot be read is absent from the facts, and a limit hit is in `rejected`.
pub fn read_mail(raw: &[u8], limits: &MailLimits) -> MailFacts {
    read_mail_in_stages(raw, limits, &mut |_| {})
}

/// [`read_mail`], telling `stage` when each stage begins: `parse` (the MIME structure and
/// headers), then `extract` (texts and attachments read for order lines).
pub fn read_mail_in_stages(
    raw: &[u8],
    limits: &MailLimits,
    stage: &mut dyn FnMut(&'static str),
) -> MailFacts {
    stage("parse");
    if let Some(limit) = limit_before_parsing(raw, limits) {
        let mut facts = MailFacts::empty(raw, identity_of(raw));
        facts.rejected = Some(limit);
        return facts;
    }
    // mail-parser 0.11 panics on some malformed MIME (found by fuzzing: "Invalid part ID,
    // could not find multipart"). Such a message can never be read, so it is recorded as
    // rejected rather than retried until it is dead-lettered.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_and_read(raw, limits, stage)
    })) {
        Ok(facts) => facts,
        Err(panic) => {
            let mut facts = MailFacts::empty(raw, identity_of(raw));
            facts.rejected = Some(format!(
                "mime_parser: the MIME parser failed on this message ({})",
                panic_text(&*panic)
            ));
            facts
        }
    }
}

fn parse_and_read(
    raw: &[u8],
    limits: &MailLimits,
    stage: &mut dyn FnMut(&'static str),
) -> MailFacts {
    let content_sha256 = sha256_hex(raw);
    // Closing boundaries a mailer left out are added first (the identity and the hash stay
    // those of the bytes as received).
    let framed = super::framing::close_open_parts(raw);
    let Some(message) = MessageParser::default().parse(&framed[..]) else {
        return MailFacts::empty(raw, format!("sha256:{content_sha256}"));
    };
    let identity = usable_message_id(message.message_id())
        .unwrap_or_else(|| format!("sha256:{content_sha256}"));
    // The walk before parsing bounds what the parser builds; this bound on what it did build
    // holds whatever header the walk read differently from the parser.
    let (depth, parts) = shape(&message);
    if depth > limits.max_rfc822_nesting || parts > limits.max_mime_parts {
        let mut facts = MailFacts::empty(raw, identity);
        facts.rejected = Some(format!(
            "max_rfc822_nesting: the parser found {depth} nested messages and {parts} parts"
        ));
        dismantle(message);
        return facts;
    }
    let sender = message
        .from()
        .and_then(|a| a.iter().find_map(|addr| addr.address()))
        .map(|a| a.trim().to_lowercase())
        .filter(|a| a.contains('@') && a.len() <= super::MAX_SENDER);
    let subject = message
        .subject()
        .map(|s| super::clip(s, super::MAX_STORED_SUBJECT).into_owned());
    let auto_reply = auto_reply(&message, sender.as_deref());
    let no_reply = no_reply(&message, sender.as_deref(), auto_reply.as_ref());
    let message_id = usable_message_id(message.message_id())
        .and_then(|id| id.strip_prefix("mid:").map(|id| format!("<{id}>")))
        .filter(|id| message_ids(id).len() == 1);
    let references = message
        .header_raw("References")
        .map(message_ids)
        .unwrap_or_default();
    let auth_results = authentication_results(&message);
    stage("extract");
    let mode = if is_forward(subject.as_deref()) {
        TextMode::Forward
    } else {
        TextMode::Message
    };
    let mut reader = Reader {
        limits,
        hasher: Sha256::new(),
        parts: Vec::new(),
        unsupported: None,
        rejected: None,
        unnamed: 0,
    };
    reader
        .hasher
        .update(sender.as_deref().unwrap_or("").as_bytes());
    reader.hasher.update(b"\n");
    reader.hash_text(subject.as_deref().unwrap_or(""));
    reader.message(&message, mode);
    dismantle(message);
    MailFacts {
        identity,
        content_sha256,
        fingerprint: hex::encode(reader.hasher.finalize()),
        sender,
        subject,
        parts: reader.parts,
        auto_reply,
        unsupported: reader.unsupported,
        rejected: reader.rejected,
        message_id,
        references,
        auth_results,
        no_reply,
        verified: None,
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
            read_mail(raw, &MailLimits::default()).identity,
            "mid:abc@x.example"
        );
        let none = b"From: a@b.example\r\n\r\nhi";
        assert!(identity_of(none).starts_with("sha256:"));
        assert_eq!(
            identity_of(none),
            read_mail(none, &MailLimits::default()).identity
        );
    }

    #[test]
    fn the_display_name_is_never_the_sender() {
        let raw = "From: \"orders@acme.example\" <mallory@evil.example>\r\n\r\nSKU-1 x 1";
        let facts = read_mail(raw.as_bytes(), &MailLimits::default());
        assert_eq!(facts.sender.as_deref(), Some("mallory@evil.example"));
    }

    #[test]
    fn only_mail_that_may_be_answered_is_answerable() {
        let base = "From: Buyer <buyer@acme.example>\r\nMessage-ID: <po-7@acme.example>\r\nReferences: <a@x> bad <b@y>\r\nSubject: PO\r\n";
        let facts = read_mail(
            format!("{base}\r\nSKU-1 x 1").as_bytes(),
            &MailLimits::default(),
        );
        assert_eq!(facts.no_reply, None);
        assert_eq!(facts.message_id.as_deref(), Some("<po-7@acme.example>"));
        assert_eq!(
            facts.references,
            vec!["<a@x>".to_owned(), "<b@y>".to_owned()]
        );
        for (header, why) in [
            ("List-Id: <sales.lists.acme.example>", "List-Id"),
            ("Precedence: bulk", "bulk"),
            ("Precedence: list", "list"),
            ("Auto-Submitted: auto-replied", "Auto-Submitted"),
            ("Return-Path: <>", "null sender"),
            (
                "X-Auto-Response-Suppress: OOF, AutoReply",
                "X-Auto-Response-Suppress",
            ),
        ] {
            let raw = format!("{base}{header}\r\n\r\nSKU-1 x 1");
            let facts = read_mail(raw.as_bytes(), &MailLimits::default());
            assert!(
                facts.no_reply.as_deref().is_some_and(|w| w.contains(why)),
                "{header}: {:?}",
                facts.no_reply
            );
        }
        let raw = "From: no-reply@shop.example\r\n\r\nSKU-1 x 1";
        let facts = read_mail(raw.as_bytes(), &MailLimits::default());
        assert!(facts.no_reply.is_some());
    }

    #[test]
    fn garbage_gives_facts_not_panics() {
        for raw in [
            &b""[..],
            b"\xff\xfe\x00",
            b"From: \xff\xff\r\nSubject: \xc3\x28\r\n\r\n\xff",
            b"Content-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x\r\n--x--",
        ] {
            let facts = read_mail(raw, &MailLimits::default());
            assert!(facts.identity.starts_with("sha256:") || facts.identity.starts_with("mid:"));
            assert!(facts.extraction(|_| true).lines.is_empty());
        }
    }
}
