//! Task source adapters.

#[cfg(feature = "source-maildir")]
pub mod maildir;
