//! Adapters of the plba runtime: concrete queues and task sources, each behind a cargo
//! feature so that a service compiles only what its configuration can select.
//!
//! | feature | module | what |
//! |---|---|---|
//! | `queue-memory` | [`queue::memory`] | bounded in-process queue with leases, delays and dead letters |
//! | `queue-redis` | [`queue::redis`] | Redis Streams: consumer group, retries, dead letters, takeover |
//! | `queue-amqp` | [`queue::amqp`] | RabbitMQ (AMQP 0-9-1): quorum queues, confirms, TTL retry queues, DLQ |
//! | `source-maildir` | [`sources::maildir`] | a Maildir as Dovecot and Postfix write it |
//! | `source-imap` | [`sources::imap`] | an IMAP mailbox, polled or watched with IDLE |
//! | `source-webhook` | [`sources::webhook`] | deliveries POSTed by providers (Standard Webhooks, Pub/Sub, Graph) |
//! | `source-schedule` | [`sources::schedule`] | one task per slot of a cron expression in a time zone |
//! | `oauth2` | [`oauth2`] | OAuth2 access tokens (client credentials, refresh token, a file or a command) |
//! | `config-sql` | [`config_store`] | configuration overrides in an SQLite or PostgreSQL table |
//! | `control-http` | `control` | the operators' HTTP control plane (axum) |
//! | (always) | [`secret`] | checks of configured secrets (empty, short, placeholders) |
//!
//! What it is not for: business logic, lifecycle and retry policy (see `runtime-core`).
#![warn(missing_docs)]

#[cfg(feature = "config-sql")]
pub mod config_store;
#[cfg(feature = "control-http")]
pub mod control;
#[cfg(feature = "oauth2")]
pub mod oauth2;
pub mod queue;
pub mod secret;
pub mod sources;
#[cfg(feature = "oauth2")]
pub(crate) mod tls;

/// The adapters' renamed and retired configuration keys, oldest first (see
/// `runtime_core::config::ConfigBuilder::key_changes`).
pub const KEY_CHANGES: &[runtime_contracts::config::KeyChange] = &[
    // The AMQP queue's envelope limit had the name of the sources' mail size limit
    // (`max_message_bytes`, megabytes); it is the Redis queue's `max_entry_bytes`.
    runtime_contracts::config::KeyChange {
        old: "queue.max_message_bytes",
        fate: runtime_contracts::config::KeyFate::Renamed("queue.max_entry_bytes"),
        version: 1,
    },
];

/// Milliseconds since the Unix epoch.
#[allow(dead_code)]
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
