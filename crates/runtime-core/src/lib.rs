//! The plba runtime core: everything between a source and a business handler that is not
//! an adapter.
//!
//! - [`RuntimeManager`] owns the lifecycle: it starts pools before sources, reports status,
//!   and shuts down in order (sources stop, in-flight work drains until a deadline, what is
//!   left goes back to its queue).
//! - [`ConfigurationManager`] loads TOML plus `PLBA__SECTION__KEY` environment overrides,
//!   validates everything before anything starts and notifies subscribers on reload.
//! - [`WorkerSupervisor`] runs named worker pools, catches handler panics and timeouts,
//!   restarts dead workers and applies the [`RetryPolicy`].
//! - [`HealthRegistry`], [`TraceService`] and [`ServiceContainer`] are the shared services.
//!
//! What it is not for: talking to any particular queue, mailbox or database. Those are
//! adapters (`runtime-adapters`) and applications, composed by a binary.
#![warn(missing_docs)]

pub mod activity;
pub mod config;
mod container;
mod error;
mod health;
pub mod metrics;
pub mod reconcile;
pub mod retention;
pub mod retry;
mod runtime;
mod shutdown;
pub mod supervisor;
pub mod telemetry;
mod trace;

pub use config::LogFormat;
pub use config::{
    ConfigOrigin, ConfigReport, ConfigurationManager, Overrides, PlatformConfig, PoolConfig,
};
pub use container::ServiceContainer;
pub use error::CoreError;
pub use health::{HealthRegistry, HealthReport};
pub use metrics::Metrics;
pub use reconcile::{ReconcileConfig, Reconciler, SweepReport};
pub use retry::RetryPolicy;
pub use runtime::{
    ConfigStatus, Diagnostics, Finding, LeaseReport, PendingRetry, QueueFactory, RejectedChange,
    ReloadReport, RuntimeBuilder, RuntimeManager, RuntimeState, RuntimeStatus, ShutdownReport,
    SourceReport,
};
pub use shutdown::TokenSignal;
pub use supervisor::{PoolStatus, WorkerSupervisor};
pub use telemetry::{Telemetry, TelemetryConfig};
pub use trace::{
    install_subscriber, install_subscriber_as, install_subscriber_with, LogControl, TraceService,
};

/// Milliseconds since the Unix epoch, for records.
/// A named fault point of the fault suite (`failpoints` feature; nothing without it). Its
/// actions are the `fail` crate's (`panic`, `sleep(ms)`, `pause`, ...); `return` makes the
/// step fail with an error naming the point, `return(abort)` aborts the process there, as
/// `kill -9` would.
pub(crate) fn fault(name: &str) -> Result<(), String> {
    let _ = name;
    fail::fail_point!(name, |arg| {
        if arg.as_deref() == Some("abort") {
            std::process::abort();
        }
        Err(format!("fault point {name}"))
    });
    Ok(())
}

pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
