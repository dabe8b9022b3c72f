//! The bot's business: reading a purchase-order email, resolving its client, extracting its
//! lines and recording exactly one outcome for it.
//!
//! Invariant: this module, like `module.rs`, uses no runtime crate but `runtime-contracts`
//! (checked by `tests/architecture.rs`). It knows nothing of Maildir, IMAP or queues.

pub mod clients;
pub mod extract;
pub mod message;
pub mod store;

/// Every outcome a message can end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// An order was created.
    Created,
    /// The message was seen before; nothing new was created.
    Duplicate,
    /// The sender matches no client.
    UnknownClient,
    /// No order lines were found.
    NoLines,
    /// A safety limit was hit (the reason names it); the message is never parsed.
    Rejected,
    /// The message could not be handled after every attempt; it stays unread.
    Failed,
}

impl OutcomeKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Duplicate => "duplicate",
            Self::UnknownClient => "unknown_client",
            Self::NoLines => "no_lines",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
