//! Task source adapters.

#[cfg(feature = "source-maildir")]
pub mod maildir;

#[cfg(feature = "source-imap")]
pub mod imap;
