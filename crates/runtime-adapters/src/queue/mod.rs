//! Queue adapters.

#[cfg(feature = "queue-memory")]
pub mod memory;

#[cfg(feature = "queue-redis")]
pub mod redis;
