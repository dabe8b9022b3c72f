//! The bot's business: reading a purchase-order email, resolving its client, extracting its
//! lines and recording exactly one outcome for it.
//!
//! Invariant: this module, like `module.rs`, uses no runtime crate but `runtime-contracts`
//! (checked by `tests/architecture.rs`). It knows nothing of Maildir, IMAP or queues.

pub mod charset;
pub mod clients;
pub mod erp;
pub mod extract;
pub mod framing;
pub mod html;
pub mod message;
pub mod outbox;
pub mod peer;
pub mod replay;
pub mod reply;
pub mod sender_auth;
pub mod sheets;
pub mod store;
pub mod structure;

/// Longest subject kept with an outcome, in characters.
pub const MAX_STORED_SUBJECT: usize = 998;
/// Longest reason kept with an outcome, in characters.
pub const MAX_STORED_REASON: usize = 2_000;
/// Most invalid lines named in a reason; the rest are counted.
pub const MAX_NAMED_INVALID: usize = 20;
/// Longest sender address taken from `From` (RFC 5321 §4.5.3.1.3: a path is at most 256
/// octets with its brackets); a longer one is no address.
pub const MAX_SENDER: usize = 254;

/// `text` cut to at most `max` characters at a character boundary; a cut text ends in
/// `…` and says how many characters were left out, so that what is stored of a mail (its
/// subject, the reasons its content yields) stays bounded however large the mail is.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(text),
        Some((cut, _)) => {
            let left = text[cut..].chars().count();
            let note = format!("… ({left} more characters)");
            let keep = text
                .char_indices()
                .nth(max.saturating_sub(note.chars().count()))
                .map_or(cut, |(i, _)| i);
            std::borrow::Cow::Owned(format!("{}{note}", &text[..keep]))
        }
    }
}

/// Every outcome a message can end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// An order was created.
    Created,
    /// The message was seen before (same identity, same content); nothing new was created.
    Duplicate,
    /// A message with the Message-ID of an earlier one but different content: kept for an
    /// operator under its own identity, never silently dropped, never an order.
    ConflictingDuplicate,
    /// The sender matches no client.
    UnknownClient,
    /// No order lines were found.
    NoLines,
    /// A bounce, a delivery report or an out-of-office reply: never an order, never answered.
    AutoReply,
    /// Content the bot cannot read (S/MIME, PGP, TNEF `winmail.dat`) and no lines elsewhere.
    UnsupportedContent,
    /// The sender could not be authenticated (no passing, aligned DMARC, DKIM or SPF result
    /// from the trusted mail system): never an order, never answered.
    UnauthenticatedSender,
    /// A safety limit was hit (the reason names it); the process lives on.
    Rejected,
    /// The message could not be handled after every attempt; it stays unread.
    Failed,
    /// The message was gone when its task ran (deleted, moved, or its mailbox's UIDVALIDITY
    /// changed); the reason says which. Nothing was read.
    Skipped,
}

impl OutcomeKind {
    /// Every outcome.
    pub const ALL: [Self; 11] = [
        Self::Created,
        Self::Duplicate,
        Self::ConflictingDuplicate,
        Self::UnknownClient,
        Self::NoLines,
        Self::AutoReply,
        Self::UnsupportedContent,
        Self::UnauthenticatedSender,
        Self::Rejected,
        Self::Failed,
        Self::Skipped,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Duplicate => "duplicate",
            Self::ConflictingDuplicate => "conflicting_duplicate",
            Self::AutoReply => "auto_reply",
            Self::UnsupportedContent => "unsupported_content",
            Self::UnknownClient => "unknown_client",
            Self::NoLines => "no_lines",
            Self::UnauthenticatedSender => "unauthenticated_sender",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
