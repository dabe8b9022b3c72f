//! Queue adapters.

#[cfg(feature = "queue-memory")]
pub mod memory;
