//! A cancellation signal that does not tie the contracts to an async runtime.

use std::sync::Arc;

use crate::BoxFuture;

/// A signal that fires once and stays fired. The runtime core implements it with a
/// cancellation token; sources, workers and handlers only observe it.
///
/// ```
/// use runtime_contracts::{BoxFuture, CancelSignal};
/// struct Never;
/// impl CancelSignal for Never {
///     fn is_cancelled(&self) -> bool { false }
///     fn cancelled(&self) -> BoxFuture<'_, ()> { Box::pin(std::future::pending()) }
/// }
/// assert!(!Never.is_cancelled());
/// ```
pub trait CancelSignal: Send + Sync {
    /// Whether the signal has fired.
    fn is_cancelled(&self) -> bool;
    /// Resolves once the signal has fired. Cancel safe: dropping it loses nothing.
    fn cancelled(&self) -> BoxFuture<'_, ()>;
}

/// The shared form in which contexts carry a [`CancelSignal`].
pub type Shutdown = Arc<dyn CancelSignal>;
