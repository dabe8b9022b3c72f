//! mail-order-bot: reads purchase-order emails and creates each order exactly once.
//!
//! - [`domain`]: reading mail, resolving clients, extracting lines, storing outcomes.
//! - [`module`]: the bot as a runtime application module (its handler and config section).
//! - [`dkim`]: `sender_auth.mode = "verify"`: DKIM and DMARC checked by the bot (DNS).
//! - [`helper`]: messages read in helper processes (limits, timeouts, crashes contained).
//! - [`pages`]: the bot's pages in the operator console (outcomes, orders, one message).
//! - [`compose`]: the configuration turned into a running runtime (the only part that
//!   knows `runtime-core` and `runtime-adapters`).
//! - [`cli`]: the command line.

pub mod cli;
pub mod compose;
pub mod dkim;
pub mod domain;
pub mod explain;
pub mod helper;
pub mod module;
pub mod pages;
