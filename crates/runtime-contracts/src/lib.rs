//! The contracts of the plba runtime: small, stable traits and value types shared by the
//! runtime core, its adapters and the business applications it hosts.
//!
//! This crate is what an application's domain code may depend on. It holds no async
//! runtime, no I/O client and no policy: only the shapes of the parts and the rules each
//! part keeps, written on the trait that carries them.
//!
//! The flow these contracts describe:
//!
//! ```text
//! TaskSource --publish--> TaskQueue --consume (lease)--> Worker --> TaskHandler
//!     ^                                                    |
//!     +---------- complete (only after success) <----------+--> ack | nack(delay) | dead letter
//! ```
//!
//! What it is not for: implementations. Queues, sources and the control plane live in
//! `runtime-adapters`; lifecycle, retries and supervision live in `runtime-core`.
#![warn(missing_docs)]

use std::future::Future;
use std::pin::Pin;

pub mod action;
pub mod config;
pub mod console;
pub mod handler;
pub mod health;
pub mod module;
pub mod queue;
pub mod shutdown;
pub mod source;
pub mod task;
pub mod trace;
pub mod worker;

pub use action::{ActionError, ActionParam, ActionReport, ActionSpec, OperatorActions};
pub use config::{ConfigError, ConfigProblem, ConfigProvider, ConfigSubscriber};
pub use console::{ConsoleError, ConsolePages};
pub use handler::{HandlerContext, HandlerError, Outcome, TaskHandler};
pub use health::{HealthContributor, HealthStatus, Probe};
pub use module::{
    ApplicationModule, ModuleError, ModuleRegistry, OutcomeLookup, PoolDefaults, RetentionPolicy,
    RetentionSweep,
};
pub use queue::{
    ConsumerInfo, DeadLetter, DeadLetterPage, DeadLetterStore, Inspection, Lease, LeaseHolder,
    LeaseInfo, Leases, PublishResult, QueueError, QueueStats, RetryInfo, TaskQueue,
};
pub use shutdown::{CancelSignal, Shutdown};
pub use source::{
    Backpressure, Disposition, GoneReason, NoSources, Reconfigure, SourceContext, SourceError,
    SourceLease, SourceState, SourceStatus, SourceWaker, TaskSource,
};
pub use task::{AttemptFailure, Headers, Task, TaskError, TaskId};
pub use trace::{SpanGuard, StageTracer, TraceFactory};
pub use worker::{Worker, WorkerContext, WorkerError};

/// A boxed, sendable future: the return type of every async method in these contracts, so
/// that the traits stay object safe (`Arc<dyn TaskQueue>`) across crate boundaries.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
